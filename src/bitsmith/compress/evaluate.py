"""Perplexity and bits per character of a causal LM on a text.

How a text is scored (`perplexity`)
-----------------------------------
The text is tokenized once, without special tokens. Every scored token is predicted from at least one earlier token:

* BOS. If the tokenizer adds a BOS token when encoding normally (Gemma, Llama 2/3: `tokenizer("x")` starts with
  `bos_token_id`), every window starts with BOS, and the first text token is scored too (predicted from BOS alone).
  Such models were trained with BOS always at position 0 and degrade without it. If the tokenizer adds no BOS
  (SmolLM2, GPT-2, Qwen), nothing is prepended: the first text token is context only and is not scored, and its
  characters are not counted. `bos=True/False` overrides the detection.
* Windows. A window holds at most `window` tokens (BOS included). Each window scores the next `stride` tokens
  after the previous window's (the last window: what is left), and is filled back to `window` tokens with the tokens
  before them as context. Every scorable token is scored exactly once, whatever the stride. The default stride,
  `window - 1`, gives non-overlapping chunks: with BOS each window is BOS + `window - 1` new tokens; without BOS, the
  previous chunk's last token + `window - 1` new tokens (only the last, shorter chunk gets more context). A smaller
  stride gives every token more context (a lower, slower perplexity); a window of 1024 with stride 512 costs about
  twice the compute of the default.
* `max_tokens` cuts the text, not the token list: the text is cut at the start of token number `max_tokens` (plus one
  when the first token is not scored) of the full tokenization, trailing whitespace is dropped, and the cut text is
  tokenized again and scored whole. So the scored tokens are exactly the tokenization of a known prefix of the text,
  and bits per character divide by the length of that prefix (minus the first token's characters when it is not
  scored): the characters counted are exactly those the scored tokens encode. The number of tokens scored can come
  out a token or two below `max_tokens` (never above).

bits_per_char = total NLL (in bits) / characters scored. It does not depend on the tokenizer, so it compares models
with different vocabularies (SmolLM2's 49k and Gemma's 262k); perplexity does not. bits_per_byte divides by the UTF-8
bytes instead (equal for ASCII text).

Precision. Log-softmax and the loss run in float32 whatever the model's dtype, and the total NLL is accumulated in
float64; results are deterministic for a given model, text, settings and machine. `evaluate_path` computes in
float32 on CPU: on this project's CPU (2 cores, torch 2.13) bf16 matmuls were measured slower than float32 and change
the perplexity in the third digit (docs/results/baseline.md has the numbers); upcasting bf16 weights to float32 is
exact.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import BitsmithError, CheckpointError

_LN2 = math.log(2.0)


# -------------------------------------------------------------------------------------------------------- tokenize

def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """Token ids of `text` without special tokens, and character offsets when the tokenizer can give them."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow (Python) tokenizers have no offsets
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
        offsets = None
    return list(enc["input_ids"]), offsets


def uses_bos(tokenizer) -> bool:
    """Whether `tokenizer` puts its BOS token first when encoding with special tokens (the model expects BOS)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    without = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    return len(with_special) > len(without) and with_special[0] == bos


def _cut(tokenizer, text: str, limit: int) -> tuple[str, list[int], list[tuple[int, int]] | None]:
    """The longest clean prefix of `text` whose tokenization has at most `limit` tokens, its ids and offsets."""
    # Tokenize a growing prefix rather than the whole text (a 4 MB book costs seconds); the exact cut is made below.
    span = min(len(text), max(4096, 8 * (limit + 16)))
    while True:
        ids, offsets = _encode(tokenizer, text[:span])
        if span == len(text) and len(ids) <= limit:
            return text, ids, offsets
        if len(ids) > limit + 16 or span == len(text):
            break
        span = min(len(text), 2 * span)
    if offsets is not None:
        cut = offsets[limit][0]
        while True:
            cut = len(text[:cut].rstrip())
            ids, offsets = _encode(tokenizer, text[:cut])
            if len(ids) <= limit or cut == 0:
                break
            cut = offsets[limit][0]  # re-tokenizing merged differently at the edge: cut one token earlier
    else:  # no offsets: the longest prefix (by bisection on characters) with at most `limit` tokens
        lo, hi = 0, span
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(_encode(tokenizer, text[:mid])[0]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        cut = len(text[:lo].rstrip())
        ids, offsets = _encode(tokenizer, text[:cut])
    return text[:cut], ids, offsets


# --------------------------------------------------------------------------------------------------------- scoring

def _check_int(name: str, value: Any, low: int, high: int | None = None, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        raise BitsmithError(f"{name} must be {allowed}, got {value!r}{hint}")


def _model_device(model):
    import torch

    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters(), torch.empty(0)).device


def perplexity(model, tokenizer, text: str, max_tokens: int | None = None, window: int = 1024,
               stride: int | None = None, device=None, progress: bool = True, *, bos: bool | None = None) -> dict:
    """Score `text` with a causal LM; return perplexity, NLL per token, bits per character and byte, and counts.

    `window`: most tokens the model sees at once (BOS included). `stride`: new tokens scored per window, 1 to
    `window - 1`; default `window - 1` (non-overlapping chunks, each token scored once; see the module docstring for
    the exact scheme and BOS handling). `max_tokens`: score only the first `max_tokens` tokens' worth of text, with
    the characters counted exactly. `device`: where inputs go (default: the model's embedding device; the model
    must already be there). `bos`: None detects whether the tokenizer uses BOS. Progress goes to stderr.

    Returns a dict: ppl, nll_per_token (nats), bits_per_token, bits_per_char, bits_per_byte, nll_sum (nats),
    tokens (scored), chars, bytes (scored), text_chars (of the whole text), truncated (whether max_tokens cut it),
    window, stride, windows (forward passes), bos (whether BOS was prepended).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    if not isinstance(text, str):
        raise BitsmithError(f"text must be a str, got {type(text).__name__}")
    _check_int("window", window, 2)
    limit_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit_pos, int) and window > limit_pos:
        raise BitsmithError(f"window {window} is longer than the model's context ({limit_pos} tokens, "
                            f"max_position_embeddings in config.json); use --window {limit_pos} or less")
    if stride is None:
        stride = window - 1
    _check_int("stride", stride, 1, window - 1,
               " (a window of W tokens scores at most W-1 new ones: one token of context is needed)")
    if max_tokens is not None:
        _check_int("max_tokens", max_tokens, 1)
    if bos is None:
        bos = uses_bos(tokenizer)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos and bos_id is None:
        raise BitsmithError("bos=True, but the tokenizer has no BOS token")
    first = 0 if bos else 1  # index of the first scored token

    if max_tokens is None:
        used = text
        ids, offsets = _encode(tokenizer, text)
    else:
        used, ids, offsets = _cut(tokenizer, text, max_tokens + first)
    n = len(ids)
    if n - first < 1:
        raise BitsmithError(f"the text is too short to score: {n} token(s)"
                            + ("" if bos else " (without BOS the first token is only context; at least 2 are needed)"))
    chars, nbytes = len(used), len(used.encode("utf-8"))
    if not bos:  # the first token is not scored: neither are its characters
        head = used[:offsets[0][1]] if offsets is not None else tokenizer.decode(ids[:1])
        chars -= len(head)
        nbytes -= len(head.encode("utf-8"))

    dev = torch.device(device) if device is not None else _model_device(model)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    prefix = [bos_id] if bos else []
    starts = list(range(first, n, stride))
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    bar = tqdm(starts, desc="perplexity", unit="window", file=sys.stderr, disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for s0 in bar:
                e = min(s0 + stride, n)
                a = max(0, e - (window - len(prefix)))
                inp = torch.tensor([prefix + ids[a:e]], dtype=torch.long, device=dev)
                scored = e - s0
                if keep_arg:
                    logits = model(input_ids=inp, use_cache=False, logits_to_keep=scored + 1).logits[0, :-1]
                else:
                    logits = model(input_ids=inp, use_cache=False).logits[0, -scored - 1:-1]
                target = torch.tensor(ids[s0:e], dtype=torch.long, device=dev)
                nll_sum += F.cross_entropy(logits.float(), target, reduction="sum").double().item()
                bar.set_postfix(ppl=f"{math.exp(nll_sum / (e - first)):.3f}", refresh=False)
    finally:
        bar.close()
        model.train(was_training)

    tokens = n - first
    nll = nll_sum / tokens
    return {
        "ppl": math.exp(nll),
        "nll_per_token": nll,
        "bits_per_token": nll / _LN2,
        "bits_per_char": nll_sum / _LN2 / chars if chars else float("nan"),
        "bits_per_byte": nll_sum / _LN2 / nbytes if nbytes else float("nan"),
        "nll_sum": nll_sum,
        "tokens": tokens,
        "chars": chars,
        "bytes": nbytes,
        "text_chars": len(text),
        "truncated": len(used) < len(text),
        "window": window,
        "stride": stride,
        "windows": len(starts),
        "bos": bool(bos),
    }


# ------------------------------------------------------------------------------------------------------- from disk

def read_text(text_path: str | os.PathLike) -> str:
    """The UTF-8 text in `text_path`, with a BitsmithError naming the file when it cannot be read."""
    p = Path(text_path).expanduser()
    if not p.is_file():
        raise BitsmithError(f"{p}: no such text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BitsmithError(f"{p}: not UTF-8 text (byte {e.start}); pass a UTF-8 .txt file") from None
    except OSError as e:
        raise BitsmithError(f"{p}: cannot read ({e.strerror})") from None


def _resolve_dtype(dtype, device):
    import torch

    if dtype is None:
        return torch.float32 if device.type == "cpu" else "auto"
    if isinstance(dtype, str) and dtype != "auto":
        allowed = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in allowed:
            raise BitsmithError(f"dtype {dtype!r} is not one of: auto, {', '.join(allowed)}")
        return allowed[dtype]
    return dtype


def load_model(path: str | os.PathLike, device=None, dtype=None):
    """Load a model folder (plain or bitsmith-packed) and its tokenizer for evaluation; return (model, tokenizer).

    `device` defaults to CUDA when available, else CPU. `dtype` None means float32 on CPU and the checkpoint's own
    dtype elsewhere; "auto", "float32", "bfloat16", "float16" or a torch dtype are accepted.
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    want = _resolve_dtype(dtype, dev)
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: not a model folder (no config.json)")
    try:
        from .hf_integration import load, load_tokenizer
    except ImportError:  # the transformers integration is optional at import time: plain folders still load
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=want)
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    else:
        model = load(p, torch_dtype=want)
        tokenizer = load_tokenizer(p)
    return model.to(dev), tokenizer


def evaluate_path(path: str | os.PathLike, text_path: str | os.PathLike, max_tokens: int | None = None,
                  window: int = 1024, stride: int | None = None, device=None, *, dtype=None, bos: bool | None = None,
                  progress: bool = True) -> dict:
    """`perplexity` of the model folder `path` on the text file `text_path` (see `load_model` for device/dtype).

    Adds to `perplexity`'s dict: model (folder name), text (file name, never the full path), dtype, device,
    load_seconds and seconds (wall time of the scoring).
    """
    text = read_text(text_path)
    t0 = time.perf_counter()
    model, tokenizer = load_model(path, device=device, dtype=dtype)
    t1 = time.perf_counter()
    result = perplexity(model, tokenizer, text, max_tokens=max_tokens, window=window, stride=stride,
                        progress=progress, bos=bos)
    t2 = time.perf_counter()
    result.update({
        "model": Path(path).expanduser().resolve().name,
        "text": Path(text_path).name,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(_model_device(model)),
        "load_seconds": round(t1 - t0, 3),
        "seconds": round(t2 - t1, 3),
    })
    return result


# ---------------------------------------------------------------------------------------------------------- record

RESULTS_FILE = "eval_results.json"
_RECORD_KEYS = ("tokens", "chars", "window", "stride", "ppl", "bits_per_char", "bits_per_byte", "dtype")


def record_result(model_dir: str | os.PathLike, record: dict) -> Path:
    """Append one evaluation to `<model_dir>/eval_results.json` (a JSON list); return the file's path.

    `record` is what `evaluate_path` (or `perplexity`, plus a "text" name) returned. Stored: metric, text (the file's
    base name only), tokens, chars, window, stride, ppl, bits_per_char, bits_per_byte, dtype (those present), the
    bitsmith version and the UTC date. The file is replaced atomically.
    """
    d = Path(model_dir).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"{d}: no such model folder to record results in")
    missing = [k for k in ("text", "tokens", "window", "ppl", "bits_per_char") if k not in record]
    if missing:
        raise BitsmithError(f"evaluation record lacks {', '.join(missing)}; pass the dict evaluate_path returned")
    from .. import __version__

    entry = {"metric": record.get("metric", "perplexity"),
             "text": Path(str(record["text"])).name}
    entry.update({k: record[k] for k in _RECORD_KEYS if k in record})
    entry["bitsmith_version"] = __version__
    entry["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    f = d / RESULTS_FILE
    records: list = []
    if f.exists():
        try:
            records = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f}: unreadable ({e}); move it away to start a new results file") from None
        if not isinstance(records, list):
            raise CheckpointError(f"{f}: expected a JSON list of results, found {type(records).__name__}; "
                                  f"move it away to start a new results file")
    records.append(entry)
    fd, tmp = tempfile.mkstemp(prefix=f".{RESULTS_FILE}.", dir=d)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(records, out, indent=2)
            out.write("\n")
        os.replace(tmp, f)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return f
