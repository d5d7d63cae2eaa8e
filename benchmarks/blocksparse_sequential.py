"""One-shot vs sequential (layer-by-layer) block-sparse pruning, then `recover` on the best: held-out perplexity.

    python benchmarks/blocksparse_sequential.py --model smollm2-135m --calib FILE --text FILE \
        [--configs 1x16:seq,1x16:oneshot,16x16:seq,16x16:oneshot] [--sparsity 0.5] [--tokens 8192] [--window 1024] \
        [--recover-steps 100] [--recover-lr 2e-4] [--recover-batch 4] [--recover-seq-len 256] [--out rows.jsonl]

The model is loaded once in float32 (CPU). Each configuration RxC:MODE[:SCOPE] (MODE seq or oneshot, SCOPE layer
(default) or row) starts from the dense weights and
runs `bitsmith.prune.block_sparse.prune_model` with activation scores and the least-squares refit (`--samples` x
`--seq-len` calibration tokens of --calib, seeded, as the `block_sparse` pass samples them; MODE seq sets
`sequential: true`). The pruned weights are rounded to bfloat16, as a bf16 checkpoint stores them, and scored on the
first --tokens tokens of --text (`bitsmith.compress.evaluate.perplexity`, window --window, non-overlapping, float32).
The configuration with the lowest perplexity is then distilled toward the dense model with the `recover` pass code
(--recover-steps steps of --recover-batch sequences of --recover-seq-len tokens of --calib; 0 steps: skip), rounded to
bfloat16 again and scored. One JSON line per result goes to --out (appended) and stdout. --reconstruct-epochs E sets
`reconstruct_epochs` (with --reconstruct-lr) on the seq configurations: each pruned decoder layer trained toward the
dense model's layer output; the row then records the mean relative layer-output error before and after. --save FILE
keeps the best pruned weights (bf16); --load FILE skips the pruning and recovers those weights instead.
--allocation owl (with --owl-lambda, --owl-m) sets `allocation: owl`: per-decoder-layer sparsities from the dense
model's activation outliers at the same average; the row records the layer sparsities and the achieved average.
--recover-topk K sets the recovery's `teacher_topk` (distill on the teacher's top-K words per position only).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from _common import append_jsonl, load_causal_lm, log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model folder or example name (smollm2-135m, gemma3-270m)")
    ap.add_argument("--calib", required=True, type=Path, help="calibration text file")
    ap.add_argument("--text", required=True, type=Path, help="held-out text file")
    ap.add_argument("--configs", default="1x16:seq,1x16:oneshot,16x16:seq,16x16:oneshot")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--recover-steps", type=int, default=100)
    ap.add_argument("--recover-lr", type=float, default=2e-4)
    ap.add_argument("--recover-batch", type=int, default=4)
    ap.add_argument("--recover-micro-batch", type=int, default=1)
    ap.add_argument("--recover-seq-len", type=int, default=256)
    ap.add_argument("--reconstruct-epochs", type=int, default=0, help="seq configs: block_sparse reconstruct_epochs")
    ap.add_argument("--reconstruct-lr", type=float, default=1e-4)
    ap.add_argument("--allocation", choices=["uniform", "owl"], default="uniform")
    ap.add_argument("--owl-lambda", type=float, default=0.08)
    ap.add_argument("--owl-m", type=float, default=5.0)
    ap.add_argument("--save", type=Path, default=None, help="save the best pruned weights (bf16) here")
    ap.add_argument("--load", type=Path, default=None, help="skip --configs: recover the pruned weights saved here"
                                                             " with --save")
    ap.add_argument("--recover-samples", type=int, default=None,
                    help="calibration sequences of the recovery (default max(64, steps x batch / 2))")
    ap.add_argument("--recover-topk", type=int, default=0, help="recover teacher_topk (0: full vocabulary)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense", action="store_true", help="also score the dense model")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bitsmith.compress.evaluate import perplexity, read_text
    from bitsmith.prune.block_sparse import BlockSparse, prune_model, targeted_linears
    from bitsmith.prune.recover import Recover, recover_model

    model, tok, name = load_causal_lm(args.model)
    text = read_text(args.text)
    mods = targeted_linears(model, BlockSparse(), "benchmark")
    dense = {n: m.weight.detach().clone() for n, m in mods.items()}

    def emit(row: dict) -> None:
        row = {"model": name, "text": args.text.name, "tokens": args.tokens, "window": args.window, **row}
        print(append_jsonl(args.out, row), flush=True)

    def ppl() -> tuple[float, float]:
        t = time.time()
        r = perplexity(model, tok, text, max_tokens=args.tokens, window=args.window, progress=False)
        return r["ppl"], round(time.time() - t, 1)

    def set_weights(ws: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, m in mods.items():
                m.weight.copy_(ws[n])

    def round_bf16() -> None:
        with torch.no_grad():
            for m in mods.values():
                m.weight.copy_(m.weight.to(torch.bfloat16))

    if args.dense:
        p, s = ppl()
        emit({"config": "dense", "ppl": p, "eval_s": s})
    best = None
    if args.load is not None:
        loaded = torch.load(args.load)
        best = ({"config": f"loaded:{args.load.name}"}, {n: loaded[n].to(torch.float32) for n in mods})
    for item in filter(None, args.configs.split(",") if args.load is None else []):
        block_s, mode, scope = (item.split(":") + ["layer"])[:3]
        block = tuple(int(v) for v in block_s.lower().split("x"))
        cfg = BlockSparse(sparsity=args.sparsity, block=block, score="activation", refit=True,
                          text=str(args.calib), samples=args.samples, seq_len=args.seq_len, sequential=mode == "seq",
                          scope=scope, reconstruct_epochs=args.reconstruct_epochs if mode == "seq" else 0,
                          reconstruct_lr=args.reconstruct_lr, allocation=args.allocation,
                          owl_lambda=args.owl_lambda, owl_m=args.owl_m)
        set_weights(dense)
        report = prune_model(model, cfg, tokenizer=tok, log=log)
        round_bf16()
        errs = [e["out_err_refit"] for e in report["modules"].values()]
        p, s = ppl()
        rec = cfg.reconstruct_epochs
        row = {"config": f"{block_s}@{args.sparsity}:activation+refit:{mode}" + (":row" if scope == "row" else "")
               + (f":rec{rec}@{cfg.reconstruct_lr:g}" if rec else "")
               + (f":owl{cfg.owl_lambda:g}@m{cfg.owl_m:g}" if cfg.allocation == "owl" else "")
               + (f":s{args.samples}" if args.samples != 32 else ""),
               "block": block_s, "sequential": mode == "seq", "scope": scope,
               "achieved_sparsity": round(report["sparsity"], 4), "mean_out_err": round(sum(errs) / len(errs), 5), "prune_s": report["seconds"], "recover_steps": 0,
               "ppl": p, "eval_s": s}
        if "owl" in report:
            row.update(owl_lambda=cfg.owl_lambda, owl_m=cfg.owl_m,
                       owl_layer_sparsity=[v["sparsity"] for v in report["owl"]["layers"].values()],
                       owl_outlier_ratio=[v["outlier_ratio"] for v in report["owl"]["layers"].values()])
        if rec:
            rs = [e["reconstruct"] for e in report["modules"].values() if "reconstruct" in e]
            row.update(reconstruct_epochs=rec, reconstruct_lr=cfg.reconstruct_lr,
                       layer_err_before=round(sum(r["err_first"] for r in rs) / len(rs), 5),
                       layer_err_after=round(sum(r["err_last"] for r in rs) / len(rs), 5))
        emit(row)
        if best is None or p < best[0]["ppl"]:
            best = (row, {n: m.weight.detach().clone() for n, m in mods.items()})
    if best is not None and args.save is not None:
        torch.save({n: w.to(torch.bfloat16) for n, w in best[1].items()}, args.save)
    if best is not None and args.recover_steps > 0:
        row, weights = best
        teacher = copy.deepcopy(model)
        set_weights(dense)
        teacher.load_state_dict(model.state_dict())
        set_weights(weights)
        rc = Recover(steps=args.recover_steps, batch_size=args.recover_batch, micro_batch=args.recover_micro_batch,
                     seq_len=args.recover_seq_len, lr=args.recover_lr, text=str(args.calib),
                     samples=args.recover_samples or max(64, args.recover_steps * args.recover_batch // 2), seed=1,
                     teacher_topk=args.recover_topk)
        log(f"recover {row['config']}: {rc.steps} steps x {rc.batch_size} x {rc.seq_len} tokens, lr {rc.lr}")
        rr = recover_model(model, rc, teacher, tok, progress=True, log=log)
        round_bf16()
        p, s = ppl()
        emit({**row, "recover_steps": rc.steps, "recover_batch": rc.batch_size, "recover_seq_len": rc.seq_len,
              "recover_lr": rc.lr, "recover_samples": rc.samples, "kl_first": round(rr["kl_first"], 4), "kl_last": round(rr["kl_last"], 4),
              "recover_s": rr["seconds"], "s_per_step": rr["s_per_step"], "teacher_s": rr["teacher_s"],
              **({"teacher_topk": rr["teacher_topk"], "topk_mass": rr["topk_mass"]} if args.recover_topk else {}),
              "ppl": p, "eval_s": s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
