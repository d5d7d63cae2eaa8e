"""Block-sparse pruning quality: held-out perplexity over sparsity, block shape, score, refit and recovery.

    python benchmarks/blocksparse_quality.py --model DIR --calib FILE --text FILE \
        [--tokens 8192] [--window 512] [--blocks 16x16,1x4,4x1] [--sparsities 0.1,0.3,0.5,0.7,0.9] \
        [--variants magnitude,activation,activation+refit] [--scope layer] \
        [--recover 16x16@0.5:activation+refit,...] [--recover-steps 100] [--recover-cache-gb 4] [--out results.jsonl]

The model is loaded once in float32 (CPU; bf16 weights upcast exactly). Calibration (`--samples` x `--seq-len`
tokens of --calib, seeded) runs once on the dense model: per-Linear input norms and Gram matrices, reused by every
pruning (exactly what the `block_sparse` pass computes for one run). Each configuration starts from the dense
weights, prunes every Linear but the output head with `bitsmith.prune.block_sparse.prune_model`, and is scored on
the first --tokens tokens of --text (`bitsmith.compress.evaluate.perplexity`, window --window, non-overlapping).
`--recover B@S:V` additionally distills that configuration toward the dense model (`recover` pass code, teacher =
the dense model, --recover-steps steps of --recover-batch sequences of --recover-seq-len tokens from --calib) and
scores it again; `*` stands for any block or sparsity (`*@*:activation+refit`: every configuration of that variant).
Every recovery uses the same calibration sequences, so the teacher's logits are computed once and shared
(`bitsmith.prune.recover.TeacherLogits`, up to --recover-cache-gb; the loss is the same as without the cache). One JSON line per result goes to --out (appended) and stdout; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from _common import append_jsonl, load_causal_lm


def _blocks(s: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in b.lower().split("x")) for b in s.split(",") if b]


def _done_key(r: dict) -> tuple:
    """A result row's identity for --skip-done: the configuration, and for a recovered one its recover settings."""
    if not r.get("recover_steps"):
        return (r["config"],)
    return (r["config"], r["recover_steps"], r.get("recover_batch"), r.get("recover_seq_len"), r.get("recover_lr"),
            r.get("recover_lr_scale", "absolute"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder or example name (smollm2-135m, gemma3-270m)")
    ap.add_argument("--calib", required=True, type=Path, help="calibration text file")
    ap.add_argument("--text", required=True, type=Path, help="held-out text file")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blocks", default="16x16,1x4,4x1")
    ap.add_argument("--sparsities", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--variants", default="magnitude,activation,activation+refit")
    ap.add_argument("--scope", default="layer", choices=["layer", "row", "global"])
    ap.add_argument("--refit-iters", type=int, default=25, help="conjugate-gradient steps (0: exact solves)")
    ap.add_argument("--recover", default="", help="comma list of BLOCK@SPARSITY:VARIANT to also distill")
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--recover-batch", type=int, default=4)
    ap.add_argument("--recover-seq-len", type=int, default=256)
    ap.add_argument("--recover-lr", type=float, default=5e-5)
    ap.add_argument("--recover-lr-scale", choices=("absolute", "rms"), default="absolute",
                    help="rms: --recover-lr is a fraction of each tensor's kept-weight RMS (recover's lr_scale)")
    ap.add_argument("--recover-micro-batch", type=int, default=1)
    ap.add_argument("--recover-cache-gb", type=float, default=4.0, help="teacher logits kept for reuse (0: off)")
    ap.add_argument("--recover-only", action="store_true", help="skip configurations not listed in --recover")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stats-cache", type=Path, default=None, help="save/load the calibration statistics here")
    ap.add_argument("--skip-done", action="store_true", help="skip configurations already in --out")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from bitsmith.compress.calibration import activation_bytes, calibration_batches, collect_stats
    from bitsmith.compress.evaluate import perplexity, read_text
    from bitsmith.prune.block_sparse import BlockSparse, prune_model, targeted_linears
    from bitsmith.prune.recover import Recover, TeacherLogits, recover_model

    model, tok, name = load_causal_lm(args.model)
    text = read_text(args.text)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {"model": name, "text": args.text.name, "tokens": args.tokens, "window": args.window, **row}
        rows.append(row)
        print(append_jsonl(args.out, row), flush=True)

    def ppl() -> tuple[float, float]:
        t = time.time()
        r = perplexity(model, tok, text, max_tokens=args.tokens, window=args.window, progress=False)
        return r["ppl"], round(time.time() - t, 1)

    done = set()
    if args.skip_done and args.out and args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            if r.get("model") == name and r.get("tokens") == args.tokens and r.get("text") == args.text.name:
                done.add(_done_key(r))
                rows.append(r)
    if ("dense",) not in done:
        p, s = ppl()
        emit({"config": "dense", "ppl": p, "eval_s": s})

    probe = BlockSparse(sparsity=0.5)
    dense = {n: m.weight.detach().clone() for n, m in targeted_linears(model, probe, "benchmark").items()}
    mods = targeted_linears(model, probe, "benchmark")
    t = time.time()
    if args.stats_cache and args.stats_cache.exists():
        stats = torch.load(args.stats_cache, weights_only=False)
    else:
        batches = calibration_batches(str(args.calib), tok, args.samples, args.seq_len, seed=0)
        stats = collect_stats(model, list(mods), batches, batch_size=4, gram=True)
        if args.stats_cache:
            torch.save(stats, args.stats_cache)
    calib_s = round(time.time() - t, 1)
    print(f"calibration: {args.samples} x {args.seq_len} tokens in {calib_s} s,"
          f" {activation_bytes(stats) / 2**20:.0f} MiB of statistics", file=sys.stderr, flush=True)

    def restore() -> None:
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(dense[n])

    recover_set = []
    for item in filter(None, args.recover.split(",")):
        where, variant = item.split(":")
        b, sp = where.split("@")
        recover_set.append((None if b == "*" else tuple(int(v) for v in b.lower().split("x")),
                            None if sp == "*" else float(sp), variant))

    def wants_recover(block, sp, variant) -> bool:
        return any((b is None or b == block) and (s is None or abs(s - sp) < 1e-9) and v == variant
                   for b, s, v in recover_set)

    rec_settings = {"recover_steps": args.recover_steps, "recover_batch": args.recover_batch,
                    "recover_seq_len": args.recover_seq_len, "recover_lr": args.recover_lr,
                    "recover_lr_scale": args.recover_lr_scale}
    teacher = cache = None
    for block in _blocks(args.blocks):
        for sp in [float(v) for v in args.sparsities.split(",")]:
            for variant in args.variants.split(","):
                rec = wants_recover(block, sp, variant)
                if args.recover_only and not rec:
                    continue
                cname = f"{block[0]}x{block[1]}@{sp}:{variant}"
                if (cname,) in done and (not rec or _done_key({"config": cname, **rec_settings}) in done):
                    continue
                score = "magnitude" if variant.startswith("magnitude") else "activation"
                cfg = BlockSparse(sparsity=sp, block=block, score=score, refit=variant.endswith("+refit"),
                                  scope=args.scope, refit_iters=args.refit_iters)
                restore()
                report = prune_model(model, cfg, stats=stats)
                mods_r = report["modules"].values()
                errs = [e["out_err_refit"] for e in mods_r if "out_err_refit" in e]
                errs0 = [e["out_err"] for e in mods_r if "out_err" in e]
                base = {"config": cname, "block": f"{block[0]}x{block[1]}",
                        "sparsity": sp, "variant": variant, "scope": args.scope,
                        "achieved_sparsity": round(report["sparsity"], 4),
                        "prune_s": report["seconds"]}
                if errs:
                    base["mean_out_err_masked"] = round(sum(errs0) / len(errs0), 5)
                    base["mean_out_err"] = round(sum(errs) / len(errs), 5)
                if (cname,) not in done:
                    p, s = ppl()
                    emit({**base, "recover_steps": 0, "ppl": p, "eval_s": s})
                if rec:
                    if teacher is None:
                        teacher = copy.deepcopy(model)
                        with torch.no_grad():
                            for n, m in targeted_linears(teacher, probe, "benchmark").items():
                                m.weight.copy_(dense[n])
                        cache = TeacherLogits(teacher, args.recover_cache_gb * 1e9)
                    rc = Recover(steps=args.recover_steps, batch_size=args.recover_batch,
                                 micro_batch=args.recover_micro_batch, seq_len=args.recover_seq_len,
                                 lr=args.recover_lr, lr_scale=args.recover_lr_scale, text=str(args.calib),
                                 samples=max(64, args.recover_steps * args.recover_batch // 2), seed=1)
                    rr = recover_model(model, rc, teacher, tok, teacher_cache=cache)
                    p, s = ppl()
                    emit({**base, **rec_settings, "recover_micro_batch": args.recover_micro_batch,
                          "kl_first": round(rr["kl_first"], 4), "kl_last": round(rr["kl_last"], 4),
                          "recover_s": rr["seconds"], "teacher_forwards": rr["teacher_forwards"],
                          "teacher_s": rr["teacher_s"], "ppl": p, "eval_s": s})

    print("\n| model | config | sparsity | recover steps | mean out err (masked -> refit) | ppl |")
    print("|---|---|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['model']} | {r['config']} | {r.get('achieved_sparsity', 0)} | {r.get('recover_steps', '')} |"
              f" {r.get('mean_out_err_masked', '')} -> {r.get('mean_out_err', '')} | {r['ppl']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
