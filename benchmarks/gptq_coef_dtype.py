"""How far the loader's cast of stored coefficients moves a packed weight, nearest vs `rounding: gptq` (bipolar).

    python benchmarks/gptq_coef_dtype.py --model DIR [--make-tiny] [--bits 3] [--group-size 32]

DIR is a bf16 model folder with a tokenizer; `--make-tiny` first writes the tests' tiny Llama with a byte tokenizer
there (tests/prune/conftest.py, seed 0). For each rounding it compresses DIR (bipolar; gptq with 4 x 32 calibration
tokens of the bundled sample), then for every packed module compares the weight dequantized with the stored scales to
the one dequantized with the scales cast to the model dtype (what `bitsmith.load` and `bitsmith.apply` hold), and
prints the stored dtype and the largest relative change.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--make-tiny", action="store_true")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.make_tiny:
        sys.path.insert(0, str(REPO))
        from tests.prune.conftest import make_calibrated_llama

        make_calibrated_llama(args.model)
    import bitsmith
    from safetensors.torch import load_file

    from bitsmith.compress.recipe import parse_recipe
    from bitsmith.kernels import bitplane

    dtype = getattr(torch, json.loads((args.model / "config.json").read_text()).get("torch_dtype", "bfloat16"))
    for rounding in ("nearest", "gptq"):
        extra = ", rounding: gptq, calibration: {samples: 4, seq_len: 32}" if rounding == "gptq" else ""
        recipe = (f"version: 1\npasses:\n  - {{type: bipolar, bits: {args.bits}, group_size: {args.group_size}"
                  f"{extra}}}\n")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            bitsmith.compress(parse_recipe(recipe), args.model, out, progress=False)
            modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
            t = load_file(out / "model.safetensors")
        worst, stored = 0.0, set()
        for name, e in modules.items():
            s = t[name + ".scales"]
            stored.add(str(s.dtype).replace("torch.", ""))
            args_ = (None, "bipolar", e["group_size"], e["in_features"], torch.float32)
            w = bitplane.dequantize(t[name + ".planes"], s.float(), *args_)
            w_cast = bitplane.dequantize(t[name + ".planes"], s.to(dtype).float(), *args_)
            worst = max(worst, float((w_cast - w).norm() / w.norm()))
        print(f"{rounding}: {len(modules)} modules, stored scales {sorted(stored)}, model dtype"
              f" {str(dtype).replace('torch.', '')}: largest relative weight change after the cast {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
