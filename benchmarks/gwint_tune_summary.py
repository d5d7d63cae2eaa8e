"""Summarise a gwint tuning log (tune.json from `bitsmith bench kernels --out DIR`): per tuned key, the fastest
candidate of each kernel kind (old / wide / deep / swapped, packed or not) and its time.

    python benchmarks/gwint_tune_summary.py out/bench/tune.json
"""

from __future__ import annotations

import json
import sys


def kind(cfg: dict) -> str:
    k = cfg.get("kernel", "old")
    return k + ("-packed" if cfg.get("packed") else "")


def summarise(log: list[dict]) -> list[str]:
    by_key: dict[str, dict[str, tuple[float, dict]]] = {}
    for e in log:
        if "us" not in e:
            continue
        key = str(e["key"])
        best = by_key.setdefault(key, {})
        k = kind(e["config"])
        if k not in best or e["us"] < best[k][0]:
            best[k] = (e["us"], e["config"])
    lines = []
    for key, best in by_key.items():
        lines.append(key)
        for k, (us, cfg) in sorted(best.items(), key=lambda kv: kv[1][0]):
            lines.append(f"  {k:15s} {us:8.2f} us  {cfg}")
    return lines


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print("\n".join(summarise(json.load(f))))
