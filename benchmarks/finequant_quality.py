"""FineQuant quality: perplexity of fake-quantized models on a held-out text, for a table of configurations.

    python benchmarks/finequant_quality.py --model DIR [--model DIR ...] --text FILE [--tokens 16384] [--window 1024]
        [--configs NAME,NAME,...] [--out results.jsonl] [--score relative]
    python benchmarks/finequant_quality.py --list

Each model is loaded once in float32 (CPU evaluation, as `bitsmith eval ppl` does; bf16 weights upcast exactly). For
each configuration every targeted Linear (all but the output head) is quantized from its original weight exactly as
the `finequant` pass quantizes it, and the float32 model computes with the exact dequantized weight -- the numbers a
packed folder gives under `bitsmith eval ppl` (checked for some configurations in docs/results/finequant.md).

Bits per weight count the codes at their nominal width plus one 16-bit scale per (group, row) and an 8-bit zero point
when asymmetric (`bits`); `packed_bits` also counts gwint's int32 word padding (3-bit codes: 10 per word).
`auto@gN` sets bits_budget to exactly what the fixed `gN` configuration of the same bit width costs on that model
(equal bits). One JSON line per (model, configuration) goes to --out; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _common import append_jsonl, chosen_configs, log, print_configs

# name -> FineQuant keys (None = the unquantized model). "auto@gN" budgets are resolved per model. The auto
# configurations without "-sda" predate the default candidates 16..128 and keep the candidates they were measured with.
ALL = (16, 32, 64, 128, 256, 512, "channel")
CONFIGS: dict[str, dict | None] = {
    "bf16": None,
    "int8-ch-127": dict(bits=8, group_size="channel", scale_divisor="pow2_minus_1", clip_search=False),
    "int8-ch-128": dict(bits=8, group_size="channel", scale_divisor="pow2", clip_search=False),
    "int8-ch-127-clip": dict(bits=8, group_size="channel", scale_divisor="pow2_minus_1", clip_search=True),
    "int4-ch-rtn": dict(bits=4, group_size="channel", clip_search=False),
    "int4-g32-rtn": dict(bits=4, group_size=32, clip_search=False),
    "int4-g64-rtn": dict(bits=4, group_size=64, clip_search=False),
    "int4-g128-rtn": dict(bits=4, group_size=128, clip_search=False),
    "int4-g128-rtn-pow2": dict(bits=4, group_size=128, clip_search=False, scale_divisor="pow2"),
    "int4-g128-clip-pow2": dict(bits=4, group_size=128, clip_search=True, scale_divisor="pow2"),
    "int4-g128-asym-rtn": dict(bits=4, group_size=128, symmetric=False, clip_search=False),
    "int4-g128-asym-clip": dict(bits=4, group_size=128, symmetric=False, clip_search=True),
    "int4-ch-clip": dict(bits=4, group_size="channel", clip_search=True),
    "int4-g32-clip": dict(bits=4, group_size=32, clip_search=True),
    "int4-g64-clip": dict(bits=4, group_size=64, clip_search=True),
    "int4-g128-clip": dict(bits=4, group_size=128, clip_search=True),
    "int4-auto@g128": dict(bits=4, group_size="auto", clip_search=True, bits_budget="@128", candidates=ALL),
    "int4-auto@g64": dict(bits=4, group_size="auto", clip_search=True, bits_budget="@64", candidates=ALL),
    "int4-auto@g32": dict(bits=4, group_size="auto", clip_search=True, bits_budget="@32", candidates=ALL),
    "int4-auto@g128-rtn": dict(bits=4, group_size="auto", clip_search=False, bits_budget="@128", candidates=ALL),
    "int4-auto@g64-rtn": dict(bits=4, group_size="auto", clip_search=False, bits_budget="@64", candidates=ALL),
    "int3-g64-rtn": dict(bits=3, group_size=64, clip_search=False),
    "int3-g128-rtn": dict(bits=3, group_size=128, clip_search=False),
    "int3-g64-clip": dict(bits=3, group_size=64, clip_search=True),
    "int3-g128-clip": dict(bits=3, group_size=128, clip_search=True),
    "int3-auto@g128": dict(bits=3, group_size="auto", clip_search=True, bits_budget="@128", candidates=ALL),
    "int3-auto@g64": dict(bits=3, group_size="auto", clip_search=True, bits_budget="@64", candidates=ALL),
    "int3-g32-rtn": dict(bits=3, group_size=32, clip_search=False),
    "int3-g32-clip": dict(bits=3, group_size=32, clip_search=True),
    "int3-auto@g32": dict(bits=3, group_size="auto", clip_search=True, bits_budget="@32", candidates=ALL),
    "int3-g64-rtn-pow2": dict(bits=3, group_size=64, clip_search=False, scale_divisor="pow2"),
    "int3-g64-clip-pow2": dict(bits=3, group_size=64, clip_search=True, scale_divisor="pow2"),
    "int3-auto@g64-pow2": dict(bits=3, group_size="auto", clip_search=True, bits_budget="@64", scale_divisor="pow2",
                               candidates=ALL),
    "int4-auto@g64-pow2": dict(bits=4, group_size="auto", clip_search=True, bits_budget="@64", scale_divisor="pow2",
                               candidates=ALL),
    "int3-g64-rtn": dict(bits=3, group_size=64, clip_search=False),
    "int3-g32-rtn-pow2": dict(bits=3, group_size=32, clip_search=False, scale_divisor="pow2"),
    "int4-g64-rtn-pow2": dict(bits=4, group_size=64, clip_search=False, scale_divisor="pow2"),
    "int4-g32-rtn-pow2": dict(bits=4, group_size=32, clip_search=False, scale_divisor="pow2"),
    "int4-g64-clip-pow2": dict(bits=4, group_size=64, clip_search=True, scale_divisor="pow2"),
    "int4-g32-clip-pow2": dict(bits=4, group_size=32, clip_search=True, scale_divisor="pow2"),
    "int3-g32-clip-pow2": dict(bits=3, group_size=32, clip_search=True, scale_divisor="pow2"),
    "int4-auto@g128-rtn-pow2": dict(bits=4, group_size="auto", clip_search=False, bits_budget="@128",
                                    scale_divisor="pow2", candidates=ALL),
    "int4-auto@g64-rtn-pow2": dict(bits=4, group_size="auto", clip_search=False, bits_budget="@64",
                                   scale_divisor="pow2", candidates=ALL),
    "int3-auto@g32-rtn-pow2": dict(bits=3, group_size="auto", clip_search=False, bits_budget="@32",
                                   scale_divisor="pow2", candidates=ALL),
    "int3-auto@g64-rtn-pow2": dict(bits=3, group_size="auto", clip_search=False, bits_budget="@64",
                                   scale_divisor="pow2", candidates=ALL),
    # scale_divisor auto (each group's scale rule by least |error|^4), fixed group sizes and group_size auto with the
    # default candidates 16..128
    **{f"int{b}-sda-g{g}": dict(bits=b, group_size=g, scale_divisor="auto") for b in (4, 3) for g in (128, 64, 32)},
    **{f"int{b}-auto@g{g}-sda": dict(bits=b, group_size="auto", scale_divisor="auto", bits_budget=f"@{g}")
       for b in (4, 3) for g in (128, 64, 32)},
    # auto with fewer candidates (no group coarser than 128): same profiles, options filtered
    "int4-auto@g128-le128": dict(bits=4, group_size="auto", clip_search=True, bits_budget="@128",
                                 candidates=(16, 32, 64, 128)),
    "int4-auto@g64-le128": dict(bits=4, group_size="auto", clip_search=True, bits_budget="@64",
                                candidates=(16, 32, 64, 128)),
    "int3-auto@g64-le128": dict(bits=3, group_size="auto", clip_search=True, bits_budget="@64",
                                candidates=(16, 32, 64, 128)),
}


def targets(model, cfg):
    from bitsmith.quant import adaptive

    named = dict(model.named_modules())
    return [(n, named[n[: -len(".weight")]]) for n, _ in adaptive.iter_model_weights(model, cfg)]


def fixed_bits(shapes, bits, group_size, symmetric=True):
    from bitsmith.quant.groupwise import storage_bits

    total = sum(storage_bits(N, K, bits, min(group_size, K), symmetric) for N, K in shapes)
    return total / sum(N * K for N, K in shapes)


def cached_profiles(cache, originals, cfg, log):
    """Profiles of every target with every candidate (ALL), as the pass computes them; kept in `cache` (a dict
    with an optional "dir" entry: pickled there per model and quantizer settings, reused across runs)."""
    import pickle

    from bitsmith.quant import adaptive

    key = (cfg.bits, cfg.symmetric, cfg.scale_divisor, cfg.use_clip)
    if key in cache:
        return cache[key]
    path = None
    if cache.get("dir"):
        path = Path(cache["dir"]) / (f"{cache['model']}-b{cfg.bits}-{'sym' if cfg.symmetric else 'asym'}"
                                     f"-{cfg.scale_divisor}-{'clip' if cfg.use_clip else 'rtn'}"
                                     f"-rows{adaptive.PROFILE_ROWS}.pkl")
        if path.exists():
            cache[key] = pickle.loads(path.read_bytes())
            log(f"  profiles from {path}")
            return cache[key]
    tp = time.time()
    cache[key] = [adaptive.profile_matrix(
        n, w, bits=cfg.bits, symmetric=cfg.symmetric, scale_divisor=cfg.scale_divisor, scale_dtype=w.dtype,
        clip_search=cfg.use_clip, candidates=ALL) for n, w in originals.items()]
    log(f"  profiled {len(originals)} matrices in {time.time() - tp:.1f} s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(cache[key]))
    return cache[key]


def run_config(model, originals, name, spec, profiles_cache, log):
    """Quantize every target in place (from `originals`), return facts: bits, packed_bits, group sizes, seconds."""
    from bitsmith.quant import adaptive
    from bitsmith.quant.finequant import FineQuant, quantize_matrix
    from bitsmith.quant.groupwise import packed_bits, storage_bits

    t0 = time.time()
    spec = dict(spec)
    budget = spec.pop("bits_budget", None)
    shapes = [tuple(w.shape) for w in originals.values()]
    if isinstance(budget, str):  # "@N": what fixed group size N costs here
        budget = fixed_bits(shapes, spec["bits"], int(budget[1:]), spec.get("symmetric", True))
    cfg = FineQuant(**spec, **({"bits_budget": budget} if budget is not None else {}))
    if cfg.group_size == "auto":
        profiles = cached_profiles(profiles_cache, originals, cfg, log)
        if tuple(cfg.candidates) != ALL:  # the same profiles, fewer options
            profiles = [adaptive.MatrixProfile(p.name, p.shape, p.energy, [
                o for o in p.options if o.group_size in adaptive.effective_sizes(cfg.candidates, p.shape[1])])
                for p in profiles]
        choice = {n: o.group_size for n, o in adaptive.allocate(profiles, cfg.budget()).items()}
    else:
        choice = {n: (K if cfg.group_size == "channel" else min(int(cfg.group_size), K))
                  for n, (N, K) in zip(originals, shapes)}
    bits = pbits = 0
    sse = energy = 0.0
    named = dict(model.named_modules())
    for n, w in originals.items():
        g = choice[n]
        _, _, _, deq = quantize_matrix(w, cfg, g)
        N, K = w.shape
        bits += storage_bits(N, K, cfg.bits, g, cfg.symmetric)
        pbits += packed_bits(N, K, cfg.bits, g, cfg.symmetric)
        sse += float((deq - w.float()).square().sum())
        energy += float(w.float().square().sum())
        with torch.no_grad():
            named[n[: -len(".weight")]].weight.copy_(deq)
    numel = sum(N * K for N, K in shapes)
    hist: dict[str, int] = {}
    for n, (N, K) in zip(originals, shapes):
        key = "ch" if choice[n] == K else str(choice[n])
        hist[key] = hist.get(key, 0) + 1
    return {"bits": bits / numel, "packed_bits": pbits / numel, "rel_sse": sse / energy, "group_sizes": hist,
            "bits_budget": budget, "quant_seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="bf16 Hugging Face folder (repeatable)")
    ap.add_argument("--text", help="held-out UTF-8 text file")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names (see --list)")
    ap.add_argument("--score", default=None,
                    help="ablation: auto's matrix score (size_relative2, the default | relative | sse | size_relative)")
    ap.add_argument("--out", default=None, help="append one JSON line per result here")
    ap.add_argument("--skip-done", action="store_true", help="skip (model, config, score) rows already in --out")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--profiles", default=None, help="folder to keep group_size auto's profiles in (reused)")
    ap.add_argument("--team", default=None, help="also append each row in the team's shared format to this file")
    ap.add_argument("--who", default="finequant")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    if args.list:
        print_configs(CONFIGS)
        return 0
    names = chosen_configs(ap, args.configs, CONFIGS)
    if not args.model or not args.text:
        ap.error("--model and --text are required")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    command = " ".join(["python"] + [a if a and " " not in a else repr(a) for a in sys.argv])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.compress.evaluate import perplexity, read_text
    from bitsmith.quant import adaptive
    from bitsmith.quant.finequant import FineQuant

    if args.score:
        adaptive.set_score(args.score)
    score = adaptive._score
    text = read_text(args.text)
    done = set()
    if args.skip_done and args.out and Path(args.out).exists():
        for line in Path(args.out).read_text().splitlines():
            r = json.loads(line)
            done.add((r["model"], r["config"], r["score"]))
    rows = []
    for mdir in args.model:
        model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(mdir)
        originals = {n: m.weight.detach().to(torch.bfloat16).clone() for n, m in targets(model, FineQuant())}
        assert all(torch.equal(originals[n].float(), m.weight) for n, m in targets(model, FineQuant()))
        profiles: dict = {"dir": args.profiles, "model": Path(mdir).name}
        for name in names:
            spec = CONFIGS[name]
            if (Path(mdir).name, name, score if spec and spec.get("group_size") == "auto" else "-") in done:
                log(f"{Path(mdir).name}: {name}: already in {args.out}")
                continue
            log(f"{Path(mdir).name}: {name}")
            facts = {"bits": 16.0, "packed_bits": 16.0} if spec is None else \
                run_config(model, originals, name, spec, profiles, log)
            t0 = time.time()
            res = perplexity(model, tok, text, max_tokens=args.tokens, window=args.window, stride=args.stride,
                             progress=False)
            row = {"model": Path(mdir).name, "config": name, "spec": spec, **facts, "ppl": res["ppl"],
                   "bits_per_char": res["bits_per_char"], "tokens": res["tokens"], "window": res["window"],
                   "stride": res["stride"], "text": Path(args.text).name,
                   "score": score if spec and spec.get("group_size") == "auto" else "-",
                   "eval_seconds": round(time.time() - t0, 1)}
            log(f"  ppl {row['ppl']:.3f}  bits {row['bits']:.4f}  {facts.get('group_sizes', '')}"
                f"  ({facts.get('quant_seconds', 0)} s quant, {row['eval_seconds']} s eval)")
            rows.append(row)
            append_jsonl(args.out, row)
            if args.team:
                desc = "bf16 (unquantized)" if spec is None else "finequant " + ", ".join(
                    f"{k}={v}" for k, v in spec.items() if k != "bits_budget") + (
                    f", bits_budget={facts['bits_budget']:.4f}" if facts.get("bits_budget") else "") + (
                    f"; group sizes {facts['group_sizes']}" if spec and spec.get("group_size") == "auto" else "")
                team = {"model": row["model"], "config": desc, "name": name, "bits_per_weight": row["bits"],
                        "packed_bits_per_weight": row["packed_bits"], "ppl": row["ppl"],
                        "bits_per_char": row["bits_per_char"], "tokens": row["tokens"], "window": row["window"],
                        "text": row["text"], "who": args.who, "command": command,
                        "note": "fake-quantized float32 model with the exact dequantized weights (what the packed"
                                " folder computes with on the CPU)"}
                append_jsonl(args.team, team)
        del model
    print("| model | config | bits/weight | ppl | group sizes |\n|---|---|---:|---:|---|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r['bits']:.4f} | {r['ppl']:.3f} | {r.get('group_sizes', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
