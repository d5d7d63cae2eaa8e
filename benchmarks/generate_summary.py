"""Print the rows of a `bitsmith bench generate` run (its JSON lines on stdout, or the --out JSON): step time,
tokens/s, warm-up, GPU time by kernel class, the top kernels.

    python benchmarks/generate_summary.py gen.log [--top 4]
"""

from __future__ import annotations

import json
import sys


def rows(path: str) -> list[dict]:
    text = open(path).read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.startswith('{"shape"')]


def main(argv: list[str]) -> int:
    top = int(argv[argv.index("--top") + 1]) if "--top" in argv else 4
    rs = rows(argv[0])
    base = {(r["shape"], r["batch"]): r.get("tokens_per_s") for r in rs if r["variant"] == "fp16"}
    for r in rs:
        b = base.get((r["shape"], r["batch"]))
        x = f"{r['tokens_per_s'] / b:.2f}x" if b and r.get("tokens_per_s") else "-"
        print(f"{r['shape']} b{r['batch']} {r['variant']} pdl={r.get('pdl')}: {r.get('ms_per_step')} ms, "
              f"{r.get('tokens_per_s')} tok/s ({x}), warm-up {r.get('warmup_s')} s {r.get('error', '')}")
        p = r.get("profile") or {}
        print("   ", p.get("us_per_step"), "launches", p.get("launches_per_step"))
        for t in p.get("top", [])[:top]:
            print("     ", t["kernel"][:60], t["us_per_step"], t["launches_per_step"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
