"""Seconds per `recover` step, full-vocabulary KL against `teacher_topk` K, on a real model (CPU, one process).

    python benchmarks/recover_step_timing.py --model gemma3-270m --calib FILE [--steps 3] [--topk 0,64]
        [--batch 4] [--micro-batch 2] [--seq-len 256] [--threads 1] [--out rows.jsonl]

The student is a copy of the model with half of each Linear's 16x16 blocks zeroed by magnitude (the speed of a step
does not depend on which weights are zero; the masks only make the KL non-zero); the teacher is the model. Each
variant runs --steps steps from the same student on the same sequences (all of them new to the teacher, as in the
recipe, where samples >= steps x batch) and reports seconds per step, the teacher's share, and the KL.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from _common import append_jsonl, load_causal_lm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--topk", default="0,64", help="comma-separated teacher_topk values (0: full vocabulary)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bitsmith.prune.block_sparse import BlockSparse, prune_model
    from bitsmith.prune.recover import Recover, recover_model

    teacher, tok, name = load_causal_lm(args.model)
    pruned = copy.deepcopy(teacher)
    prune_model(pruned, BlockSparse(sparsity=0.5, block=(16, 16), score="magnitude"))
    for k in (int(v) for v in args.topk.split(",")):
        student = copy.deepcopy(pruned)
        cfg = Recover(steps=args.steps, lr=2e-4, batch_size=args.batch, micro_batch=args.micro_batch,
                      seq_len=args.seq_len, samples=args.steps * args.batch, seed=1, text=str(args.calib),
                      teacher_topk=k)
        r = recover_model(student, cfg, teacher, tok)
        row = {"model": name, "teacher_topk": k, "steps": args.steps, "batch": args.batch,
               "micro_batch": args.micro_batch, "seq_len": args.seq_len, "threads": args.threads,
               "s_per_step": r["s_per_step"], "teacher_s_per_step": round(r["teacher_s"] / args.steps, 2),
               "kl_first": round(r["kl_first"], 4), **({"topk_mass": r["topk_mass"]} if k else {})}
        print(append_jsonl(args.out, row), flush=True)
        del student
    return 0


if __name__ == "__main__":
    sys.exit(main())
