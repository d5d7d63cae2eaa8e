"""Baseline perplexity / bits-per-character of model folders on text files (docs/results/baseline.md).

    PYTHONPATH=src python benchmarks/eval_baseline.py --model smollm2-135m --model gemma3-270m \
        --tokens 32768 --window 1024 TEXT [TEXT ...]

--model takes a folder, or an example name (its cached folder; fetched first if missing). Each model is loaded once
(float32 on CPU unless --dtype) and scored on every text; one JSON line per (model, text) goes to stdout (and to
--jsonl), then a markdown table. Wall and process CPU time are measured around each scoring.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import append_jsonl

from bitsmith.compress.evaluate import load_model, perplexity, read_text
from bitsmith.compress.examples import EXAMPLES, fetch_example, sample_text_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("texts", nargs="*", help="text files (default: the bundled sample)")
    ap.add_argument("--model", action="append", required=True, help="model folder or example name (repeatable)")
    ap.add_argument("--tokens", type=int, default=None, help="score at most this many tokens of each text")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16, auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--jsonl", type=Path, default=None, help="append result lines to this file")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    texts = [Path(t) for t in args.texts] or [sample_text_path()]
    rows = []
    for spec in args.model:
        folder = fetch_example(spec, progress=not args.no_progress) if spec in EXAMPLES else Path(spec)
        model, tok = load_model(folder, device=args.device, dtype=args.dtype)
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
        for tp in texts:
            text = read_text(tp)
            w0, c0 = time.perf_counter(), time.process_time()
            r = perplexity(model, tok, text, max_tokens=args.tokens, window=args.window, stride=args.stride,
                           progress=not args.no_progress)
            r.update(model=spec, text=tp.name, dtype=dtype, wall_s=round(time.perf_counter() - w0, 1),
                     cpu_s=round(time.process_time() - c0, 1))
            print(append_jsonl(args.jsonl, r), flush=True)
            rows.append(r)
        del model

    print("\n| model | text | tokens | chars | window/stride | dtype | ppl | bits/char | wall s | CPU s |")
    print("|---|---|--:|--:|---|---|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['model']} | {r['text']} | {r['tokens']} | {r['chars']} | {r['window']}/{r['stride']} | "
              f"{r['dtype']} | {r['ppl']:.3f} | {r['bits_per_char']:.4f} | {r['wall_s']} | {r['cpu_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
