"""Quality of bipolar-INT and BCQ (format `bitplane`) against symmetric int: held-out perplexity of each configuration.

    python benchmarks/bitplane_quality.py --model DIR [--model DIR ...] --text FILE [--tokens 8192] [--window 1024]
        [--configs NAME,...] [--out results.jsonl]
    python benchmarks/bitplane_quality.py --sensitivity --model DIR --text CALIB_FILE [--tokens 2048] [--base 3]
    python benchmarks/bitplane_quality.py --list

Each model is loaded once in float32 (bf16 weights upcast exactly, as `bitsmith eval ppl` does on CPU). For each
configuration every targeted Linear (every Linear but the output head) is quantized from its original bf16 weight by
the pass's own apply function (`bipolar`, `bcq`, `finequant`), and the model computes with the exact float32
dequantized weight, as the packed folder does (`--weights bf16`: rounded to bf16 instead, the pass's dense value). Bits per weight count everything stored (codes/planes, scales, alphas, offsets).

--sensitivity: the mixed-precision layer choice. On a calibration text (not the held-out one) it measures, for each
module type (q/k/v/o/gate/up/down_proj), the loss change when only that type moves from `--base` bits to base+1 and
to base-1 (bipolar, everything else at base), then picks per type bits in {base-1, base, base+1} minimising the
summed (additive) loss change with an average number of code bits <= base, by enumerating all 3^7 choices.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch
from _common import append_jsonl, chosen_configs, log, print_configs

TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> (pass type, keys). None = the unquantized model. "recipe:NAME" = the first pass of a bundled recipe.
CONFIGS: dict[str, tuple[str, dict] | None] = {
    "bf16": None,
    "int2-g128-rtn": ("finequant", dict(bits=2, group_size=128, clip_search=False)),
    "int3-g128-rtn": ("finequant", dict(bits=3, group_size=128, clip_search=False)),
    "int4-g128-rtn": ("finequant", dict(bits=4, group_size=128, clip_search=False)),
    "int3-g128-clip": ("finequant", dict(bits=3, group_size=128, clip_search=True)),
    "int4-g128-clip": ("finequant", dict(bits=4, group_size=128, clip_search=True)),
    "bipolar3-g128-naive": ("bipolar", dict(bits=3, group_size=128, scale_search=False)),
    "bipolar3-g128-plain": ("bipolar", dict(bits=3, group_size=128, importance="none")),
    "bipolar2-g128": ("bipolar", dict(bits=2, group_size=128)),
    "bipolar3-g128": ("bipolar", dict(bits=3, group_size=128)),
    "bipolar4-g128": ("bipolar", dict(bits=4, group_size=128)),
    "bcq3-g128": ("bcq", dict(bits=3, group_size=128)),
    "bcq3-g128-greedy-plain": ("bcq", dict(bits=3, group_size=128, init="greedy", importance="none")),
    "bcq3-g128-offset": ("bcq", dict(bits=3, group_size=128, offset=True)),
    "bcq3-g384": ("bcq", dict(bits=3, group_size=384)),
    "bcq4-g128": ("bcq", dict(bits=4, group_size=128)),
    "bipolar3-mixed": ("recipe:bipolar-w3-mixed", {}),
}


def _config(pass_type: str, keys: dict):
    from bitsmith.compress.passes import get_handler
    from bitsmith.compress.recipe import load_recipe

    if pass_type.startswith("recipe:"):
        return load_recipe(pass_type[len("recipe:"):]).passes[0]
    return get_handler(pass_type).config_cls(**keys)


def _targets(model, cfg) -> list[tuple[str, str, str, torch.nn.Module]]:
    """(module name, class name, weight name, module) of the modules `cfg` quantizes in a live model."""
    from bitsmith.compress.inventory import inventory_from_model, select

    named = dict(model.named_modules())
    chosen, skipped = select(inventory_from_model(model), cfg.targets, cfg.ignore, cfg.type)
    return [(m.name, m.class_name, m.weight, named[m.name]) for m in chosen
            if m.name not in skipped and m.shape is not None and len(m.shape) == 2]


WEIGHTS = "exact"  # --weights: "exact" (what the packed folder computes with) or "bf16" (rounded to the model dtype)


def exact_weight(packed) -> torch.Tensor:
    """The float32 weight a packed tensor stands for, as the packed module computes it on the CPU (fp32 x)."""
    from bitsmith.kernels import bitplane, gwint

    t, p = packed.tensors, packed.params
    if packed.format == "bitplane":
        coef = t["scales"] if p["kind"] == "bipolar" else t["alphas"]
        return bitplane.dequantize(t["planes"], coef, t.get("offset"), p["kind"], p["group_size"], p["in_features"],
                                   dtype=torch.float32)
    if packed.format == "gwint":
        return gwint.dequantize(t["qweight"], t["scales"], t.get("zeros"), p["bits"], p["group_size"],
                                p["in_features"], dtype=torch.float32)
    raise ValueError(f"no exact dequantization here for format {packed.format!r}")


def quantize_model(model, originals: dict[str, torch.Tensor], cfg) -> dict:
    """Quantize every target of `cfg` (from its original weight) in place; -> facts (bits, rel_sse, seconds)."""
    from bitsmith.compress.passes import TensorState, handler_for

    handler = handler_for(cfg)
    t0 = time.time()
    stored = numel = 0
    code_bits = 0.0
    sse = energy = 0.0
    for mod_name, cls, wname, mod in _targets(model, cfg):
        w = originals[wname]
        state = handler.apply(cfg, TensorState(wname, w.clone(), mod_name, cls), None)
        stored += state.packed.nbytes * 8
        code_bits += state.packed.params["bits"] * w.numel()
        numel += w.numel()
        # state.tensor is the dequantized weight rounded to the model's dtype (what a later pass would see); the
        # packed module computes with the exact product scale * code in float32
        deq = exact_weight(state.packed) if WEIGHTS == "exact" else state.tensor.float()
        sse += float((deq - w.float()).square().sum())
        energy += float(w.float().square().sum())
        with torch.no_grad():
            mod.weight.copy_(deq)
    return {"bits": stored / numel, "code_bits": code_bits / numel, "rel_sse": sse / energy,
            "quant_seconds": round(time.time() - t0, 1)}


def restore(model, originals):
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, w in originals.items():
            named[n].copy_(w.float())


def load(mdir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.quant.bipolar import Bipolar

    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(mdir)
    originals = {wname: mod.weight.detach().to(torch.bfloat16).clone() for _, _, wname, mod in _targets(model, Bipolar())}
    return model, tok, originals


def sensitivity(args, log) -> int:
    from bitsmith.compress.evaluate import perplexity, read_text
    from bitsmith.quant.bipolar import Bipolar

    text = read_text(args.text)
    base = args.base
    for mdir in args.model:
        model, tok, originals = load(mdir)

        # quantize every matrix once per bit width, then compose the configurations from these weights
        deq = {}
        for b in (base - 1, base, base + 1):
            quantize_model(model, originals, Bipolar(bits=b, group_size=128))
            deq[b] = {n: p.detach().clone() for n, p in model.named_parameters() if n in originals}
            log(f"{Path(mdir).name}: quantized at {b} bits")

        def loss(bits) -> float:
            named = dict(model.named_parameters())
            with torch.no_grad():
                for n in originals:
                    t = n.split(".")[-2]
                    named[n].copy_(deq[bits.get(t, bits["default"]) if isinstance(bits, dict) else bits][n])
            r = perplexity(model, tok, text, max_tokens=args.tokens, window=args.window, progress=False)
            return math.log(r["ppl"])

        size = {t: 0 for t in TYPES}
        for n, w in originals.items():
            t = n.split(".")[-2]
            if t in size:
                size[t] += w.numel()
        total = sum(originals[n].numel() for n in originals)
        ref = loss(base)
        log(f"{Path(mdir).name}: uniform {base}-bit calibration loss {ref:.4f}")
        delta = {}
        for t in TYPES:
            for b in (base - 1, base + 1):
                delta[(t, b)] = loss({"default": base, t: b}) - ref
                log(f"  {t} at {b} bits: d loss {delta[(t, b)]:+.4f}")
        best = None
        for choice in itertools.product((base - 1, base, base + 1), repeat=len(TYPES)):
            avg = (sum(size[t] * b for t, b in zip(TYPES, choice)) + base * (total - sum(size.values()))) / total
            if avg > base + 1e-9:
                continue
            pred = sum(delta[(t, b)] for t, b in zip(TYPES, choice) if b != base)
            if best is None or pred < best[0]:
                best = (pred, choice, avg)
        pred, choice, avg = best
        row = {"model": Path(mdir).name, "calib_text": Path(args.text).name, "tokens": args.tokens, "base": base,
               "uniform_loss": ref, "delta": {f"{t}@{b}": round(v, 5) for (t, b), v in delta.items()},
               "share": {t: round(size[t] / total, 4) for t in TYPES},
               "choice": dict(zip(TYPES, choice)), "avg_code_bits": avg, "predicted_delta": pred}
        print(append_jsonl(args.out, row), flush=True)
        print(f"| type | share | d loss at {base - 1} bits | d loss at {base + 1} bits | chosen |\n|---|---:|---:|---:|---:|")
        for t, b in zip(TYPES, choice):
            print(f"| {t} | {size[t] / total:.3f} | {delta[(t, base - 1)]:+.4f} | {delta[(t, base + 1)]:+.4f} | {b} |")
        del model
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="bf16 Hugging Face folder (repeatable)")
    ap.add_argument("--text", help="held-out UTF-8 text file (calibration text with --sensitivity)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names (see --list)")
    ap.add_argument("--sensitivity", action="store_true", help="per-type sensitivity and the mixed-precision choice")
    ap.add_argument("--base", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--weights", choices=("exact", "bf16"), default="exact",
                    help="exact: the float32 weight the packed folder computes with (default); bf16: the"
                         " dequantized weight rounded to the model dtype (the pass's dense value)")
    ap.add_argument("--out", default=None, help="append one JSON line per result here")
    ap.add_argument("--team", default=None, help="also append each row in the team's shared format to this file")
    ap.add_argument("--who", default="bitplane")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print_configs(CONFIGS)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    global WEIGHTS
    WEIGHTS = args.weights
    if not args.model or not args.text:
        ap.error("--model and --text are required")

    if args.sensitivity:
        return sensitivity(args, log)
    names = chosen_configs(ap, args.configs, CONFIGS)
    from bitsmith.compress.evaluate import perplexity, read_text

    text = read_text(args.text)
    rows = []
    for mdir in args.model:
        model, tok, originals = load(mdir)
        for name in names:
            spec = CONFIGS[name]
            log(f"{Path(mdir).name}: {name}")
            restore(model, originals)
            facts = {"bits": 16.0, "code_bits": 16.0, "rel_sse": 0.0} if spec is None else \
                quantize_model(model, originals, _config(*spec))
            t0 = time.time()
            res = perplexity(model, tok, text, max_tokens=args.tokens, window=args.window, progress=False)
            row = {"model": Path(mdir).name, "config": name, "weights": WEIGHTS, **facts, "ppl": res["ppl"],
                   "bits_per_char": res["bits_per_char"], "tokens": res["tokens"], "window": res["window"],
                   "text": Path(args.text).name, "eval_seconds": round(time.time() - t0, 1)}
            log(f"  ppl {row['ppl']:.3f}  bits {row['bits']:.4f}  rel_sse {row['rel_sse']:.5f}"
                f"  ({facts.get('quant_seconds', 0)} s quant, {row['eval_seconds']} s eval)")
            rows.append(row)
            append_jsonl(args.out, row)
            if args.team:
                desc = "bf16 (unquantized)" if spec is None else (
                    f"{spec[0]} " + ", ".join(f"{k}={v}" for k, v in spec[1].items()) if not spec[0].startswith(
                        "recipe:") else f"bundled recipe {spec[0][len('recipe:'):]}")
                team = {"model": row["model"], "config": desc, "name": name, "bits_per_weight": row["bits"],
                        "code_bits": row["code_bits"], "ppl": row["ppl"], "bits_per_char": row["bits_per_char"],
                        "tokens": row["tokens"], "window": row["window"], "text": row["text"], "who": args.who,
                        "command": " ".join(["python"] + sys.argv),
                        "note": f"fake-quantized float32 model, weights {WEIGHTS}; bits_per_weight counts packed bytes"}
                append_jsonl(args.team, team)
        del model
    print("| model | config | bits/weight | rel. weight SSE | ppl | bits/char |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['bits']:.3f} | {r['rel_sse']:.5f} | {r['ppl']:.3f} |"
              f" {r['bits_per_char']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
