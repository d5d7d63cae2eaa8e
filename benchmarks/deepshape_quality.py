"""DeepShape and RF8 quality on a real model: chains with and without DeepShape, perplexity and code entropies.

Each configuration is a chain of steps applied in memory to a fresh copy of the model (bf16 weights as stored),
then scored with `bitsmith.compress.evaluate.perplexity` (float32 on the CPU, the team protocol: first --tokens
tokens of --text, window --window, non-overlapping). Steps:

    ds       deepshape (shape_scale 0.8, std_scale 0.6 unless --shape-scale/--std-scale), per tensor
    rec      recover: distillation toward the original model on --calib (--rec-steps/--rec-seq/--rec-batch/--rec-lr)
    recgg    the same with the GG-prior penalty (--gg-prior)
    w4, w3   finequant int4/int3, group 128, clipping search
    int8     finequant int8 per channel, /127, round to nearest
    bs50     block_sparse 50%, 16x16 blocks, activation scores on --calib (32 x 256 tokens), refit
    dss      deepshape's shape change alone (nu' = 0.8 nu, the std kept)
    rf8      RF8 packed per output channel (rf8t: one offset per tensor; rf8g: groups of 128)
    rf8gptq  RF8 per channel, rounded by GPTQ (rf8_gptq: --gptq-samples x 256 tokens of --calib), then packed

A configuration is steps joined by '+', e.g. `ds+rec+w4`. Every result is one JSON line in --out (and, with
--team, the team's shared results file). `entropy` (not a chain) writes the entropy in bits/weight of the int8
per-channel codes and of the RF8 codes of every targeted weight, before and after DeepShape; `plots` writes
deepshape-NAME-before-after.png beside --out (histograms of representative weights before/after, GG fits).

    python benchmarks/deepshape_quality.py --model ~/.cache/bitsmith/examples/smollm2-135m --name smollm2-135m \\
        --text /work/shared/data/austen/persuasion.txt --calib /work/shared/data/austen/prideprejudice.txt \\
        --out /tmp/ds/smollm2.jsonl --configs bf16,rf8,int8,ds,w4,ds+w4,entropy
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def targeted(model) -> dict[str, torch.nn.Linear]:
    """Every Linear but the output head (the targets of all steps here)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def step_deepshape(model, args, **_):
    from bitsmith.prune.deepshape import DeepShape, reshape_tensor

    cfg = DeepShape(shape_scale=args.shape_scale, std_scale=args.std_scale)
    with torch.no_grad():
        for _, m in targeted(model).items():
            m.weight.copy_(reshape_tensor(m.weight.detach(), cfg)[0])
    return {"deepshape": cfg.model_dump(exclude={"targets", "ignore", "version"})}


def step_recover(model, args, teacher, tokenizer, gg=False, **_):
    from bitsmith.prune.recover import Recover, recover_model

    kw = dict(steps=args.rec_steps, seq_len=args.rec_seq, batch_size=args.rec_batch, micro_batch=1, lr=args.rec_lr,
              samples=args.rec_steps * args.rec_batch, text=str(args.calib))
    if gg:
        kw["gg_prior"] = args.gg_prior
    cfg = Recover(**kw)
    report = recover_model(model, cfg, teacher, tokenizer, log=log)
    return {"recover": {**kw, "text": Path(args.calib).name, "kl_first": round(report["kl_first"], 5),
                        "kl_last": round(report["kl_last"], 5), "seconds": report["seconds"]}}


def _fake_quant(model, fn):
    """Replace each targeted weight by its dequantized value; return stored bits over targeted weights."""
    bits = n = 0
    with torch.no_grad():
        for name, m in targeted(model).items():
            dense, nbytes = fn(m.weight.detach())
            m.weight.copy_(dense.to(m.weight.dtype))
            bits += 8 * nbytes
            n += m.weight.numel()
    return bits / n


def step_finequant(model, args, bits, group_size, clip, **_):
    from bitsmith.compress.passes import TensorState
    from bitsmith.quant.finequant import FineQuant, apply_finequant

    cfg = FineQuant(bits=bits, group_size=group_size, clip_search=clip)

    def fn(w):
        st = apply_finequant(cfg, TensorState("w", w.clone()), None)
        return st.tensor, st.packed.nbytes

    bpw = _fake_quant(model, fn)
    return {"finequant": {"bits": bits, "group_size": group_size, "clip_search": clip}, "bits_per_weight": bpw}


def step_rf8(model, args, group_size=None, scope="group", **_):
    from bitsmith.kernels import rf8

    def fn(w):
        t, p = rf8.pack(w, group_size, scope)
        return rf8.dequantize(t, p), sum(x.numel() * x.element_size() for x in t.values())

    bpw = _fake_quant(model, fn)
    return {"rf8": {"group_size": group_size or "channel", "scope": scope}, "bits_per_weight": bpw}


def step_deepshape_shape_only(model, args, **_):
    """DeepShape's shape change alone: nu' = shape_scale * nu, the std kept (scale_of std, std_scale 1)."""
    from bitsmith.prune.deepshape import DeepShape, reshape_tensor

    cfg = DeepShape(shape_scale=args.shape_scale, std_scale=1.0, scale_of="std")
    with torch.no_grad():
        for _, m in targeted(model).items():
            m.weight.copy_(reshape_tensor(m.weight.detach(), cfg)[0])
    return {"deepshape": cfg.model_dump(exclude={"targets", "ignore", "version"})}


def step_rf8_gptq(model, args, tokenizer, **_):
    from bitsmith.quant.rf8 import RF8Gptq, gptq_model

    cfg = RF8Gptq(text=str(args.calib), samples=args.gptq_samples, seq_len=256, batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # GPTQ's per-column loop is many small ops: one thread (2 thrash on a loaded CPU)
    try:
        rep = gptq_model(model, cfg, tokenizer, log=log)
    finally:
        torch.set_num_threads(threads)
    facts = step_rf8(model, args)
    facts["rf8_gptq"] = {"samples": args.gptq_samples, "seq_len": 256, "text": Path(args.calib).name,
                         "damp": cfg.damp, "block_size": cfg.block_size,
                         "output_error_vs_nearest_median": rep["output_error_vs_nearest_median"]}
    return facts


def step_block_sparse(model, args, tokenizer, **_):
    from bitsmith.prune.block_sparse import BlockSparse, prune_model

    cfg = BlockSparse(sparsity=0.5, block=(16, 16), score="activation", scope="layer", refit=True, samples=32,
                      seq_len=256, text=str(args.calib), ignore=("lm_head",))
    rep = prune_model(model, cfg, tokenizer=tokenizer, log=log)
    return {"block_sparse": {"sparsity": 0.5, "block": [16, 16], "score": "activation", "refit": True,
                             "samples": 32, "seq_len": 256, "achieved": rep.get("sparsity")}}


STEPS = {
    "ds": step_deepshape,
    "rec": step_recover,
    "recgg": lambda model, args, **kw: step_recover(model, args, gg=True, **kw),
    "w4": lambda model, args, **kw: step_finequant(model, args, 4, 128, True),
    "w3": lambda model, args, **kw: step_finequant(model, args, 3, 128, True),
    "int8": lambda model, args, **kw: step_finequant(model, args, 8, "channel", False),
    "bs50": step_block_sparse,
    "dss": step_deepshape_shape_only,
    "rf8gptq": step_rf8_gptq,
    "rf8": lambda model, args, **kw: step_rf8(model, args),
    "rf8t": lambda model, args, **kw: step_rf8(model, args, scope="tensor"),
    "rf8g": lambda model, args, **kw: step_rf8(model, args, group_size=128),
}


def entropy_bits(counts: torch.Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def code_entropies(model) -> dict:
    """Entropy (bits/weight) of int8 per-channel codes and RF8 codes, pooled over every targeted weight, and the
    weighted mean of the per-tensor entropies."""
    from bitsmith.kernels import rf8
    from bitsmith.quant.groupwise import quantize_groupwise

    pooled = {"int8": torch.zeros(256, dtype=torch.long), "rf8": torch.zeros(256, dtype=torch.long)}
    per = {"int8": 0.0, "rf8": 0.0}
    n = 0
    zeros = 0
    for _, m in targeted(model).items():
        w = m.weight.detach()
        K = w.shape[1]
        codes, _, _ = quantize_groupwise(w, 8, K, True, "pow2_minus_1", torch.bfloat16, None)
        c8 = torch.bincount(codes.reshape(-1).long(), minlength=256)
        t, _ = rf8.pack(w)
        cr = torch.bincount(t["qweight"].reshape(-1).long(), minlength=256)
        pooled["int8"] += c8
        pooled["rf8"] += cr
        per["int8"] += entropy_bits(c8) * w.numel()
        per["rf8"] += entropy_bits(cr) * w.numel()
        n += w.numel()
        zeros += int((w == 0).sum())
    return {"int8_pooled": entropy_bits(pooled["int8"]), "int8_per_tensor": per["int8"] / n,
            "rf8_pooled": entropy_bits(pooled["rf8"]), "rf8_per_tensor": per["rf8"] / n,
            "int8_zero_code_fraction": float(pooled["int8"][128]) / n, "weights": n, "exact_zeros": zeros}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True, help="model name for the records (smollm2-135m, gemma3-270m)")
    ap.add_argument("--text", required=True, help="held-out text")
    ap.add_argument("--calib", required=True, help="calibration text (block_sparse scores, recover)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--configs", required=True, help="comma-separated chains, e.g. bf16,ds+w4,entropy")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--team", type=Path, default=None, help="also append each result to this shared file")
    ap.add_argument("--shape-scale", type=float, default=0.8)
    ap.add_argument("--std-scale", type=float, default=0.6)
    ap.add_argument("--rec-steps", type=int, default=20)
    ap.add_argument("--rec-seq", type=int, default=128)
    ap.add_argument("--rec-batch", type=int, default=4)
    ap.add_argument("--rec-lr", type=float, default=1e-4)
    ap.add_argument("--gg-prior", type=float, default=1e-3)
    ap.add_argument("--gptq-samples", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.compress.evaluate import perplexity, read_text

    tok = AutoTokenizer.from_pretrained(args.model)
    text = read_text(args.text)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    base.eval()
    teacher = None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    # Chains that share a prefix (ds+rec, ds+rec+w4, ...) reuse its result: every step is deterministic, so this
    # gives the same weights as recomputing the prefix, without paying for a recovery run twice.
    wanted = {tuple(c.split("+")[:i]) for c in configs for i in range(1, len(c.split("+")))}
    cache: dict = {}
    for config in configs:
        t0 = time.time()
        if config == "plots":  # representative tensors before and after DeepShape, with their GG fits
            from bitsmith.prune import distribution as D
            from bitsmith.prune.deepshape import DeepShape, reshape_tensor

            named = {f"{n}.weight": m.weight.detach() for n, m in targeted(base).items()}
            reps = D._representatives(sorted(named, key=D._natural), 8)
            cfg = DeepShape(shape_scale=args.shape_scale, std_scale=args.std_scale)
            hists = {}
            for n in reps:
                before = named[n]
                after = reshape_tensor(before, cfg)[0]
                hists[n] = D._histogram(before, D.fit_gg(before))
                hists[n.replace(".weight", "") + " after DeepShape"] = D._histogram(after, D.fit_gg(after))
            png = args.out.parent / f"deepshape-{args.name}-before-after.png"
            D.plot_histograms(hists, png, title=f"{args.name} (left: original, right: DeepShape"
                                                f" {args.shape_scale}/{args.std_scale})")
            log(f"plots: {png}")
            continue
        if config == "entropy":
            rows = {"original": code_entropies(base)}
            ds_model = copy.deepcopy(base)
            step_deepshape(ds_model, args)
            rows["deepshape"] = code_entropies(ds_model)
            del ds_model
            rec = {"model": args.name, "config": "entropy", "entropy": rows, "shape_scale": args.shape_scale,
                   "std_scale": args.std_scale, "command": command}
            log(f"entropy: {json.dumps(rows)}")
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
            continue
        steps = [] if config == "bf16" else config.split("+")
        unknown = [s for s in steps if s not in STEPS]
        if unknown:
            raise SystemExit(f"unknown step {unknown[0]!r} in {config!r} (known: {', '.join(STEPS)})")
        done = max((i for i in range(len(steps)) if tuple(steps[:i]) in cache), default=0)
        if done:
            cached, cached_facts = cache[tuple(steps[:done])]
            model, facts = copy.deepcopy(cached), {**cached_facts, "reused_prefix": "+".join(steps[:done])}
            log(f"{config}: reusing {'+'.join(steps[:done])}")
        else:
            model, facts = copy.deepcopy(base), {}
        for i, s in enumerate(steps[done:], start=done):
            if s.startswith("rec") and teacher is None:
                teacher = copy.deepcopy(base)
            log(f"{config}: {s}")
            facts.update(STEPS[s](model, args, teacher=teacher, tokenizer=tok) or {})
            if tuple(steps[:i + 1]) in wanted:
                cache[tuple(steps[:i + 1])] = (copy.deepcopy(model), dict(facts))
        model.to(torch.float32)
        log(f"{config}: perplexity")
        res = perplexity(model, tok, text, max_tokens=args.tokens, window=args.window, progress=False)
        rec = {"model": args.name, "config": f"deepshape_quality {config}", "chain": steps,
               "bits_per_weight": facts.pop("bits_per_weight", 16.0), "ppl": res["ppl"],
               "bits_per_char": res["bits_per_char"], "tokens": res["tokens"], "window": args.window,
               "text": Path(args.text).name, "who": "deepshape (issue 6)", "command": command, "facts": facts,
               "seconds": round(time.time() - t0, 1)}
        log(f"{config}: ppl {res['ppl']:.4f} ({rec['seconds']} s)")
        for path in [args.out] + ([args.team] if args.team else []):
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        del model


if __name__ == "__main__":
    main()
