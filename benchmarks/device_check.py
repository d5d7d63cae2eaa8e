"""Tensor passes on an accelerator give the same packed model as on the CPU (run on the GPU machine).

    python benchmarks/device_check.py --device cuda --recipe finequant-w4 --recipe int8 ...

Builds a small random Llama folder, compresses it with each recipe on the CPU and on --device, and compares the
stored tensors: bit-identical ones are counted; for the others the largest difference of the dequantized weights is
reported relative to the weight's scale (reductions on a GPU may round differently, so a rare code can differ by one
step). Prints one JSON line per recipe.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch


def tiny_llama(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--recipe", action="append", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tiny"
        tiny_llama(src)
        for recipe in args.recipe:
            try:
                check(recipe, src, Path(tmp), args.device)
            except Exception as e:  # report and go on with the next recipe (one GPU call checks them all)
                print(json.dumps({"recipe": recipe, "device": args.device, "error": f"{type(e).__name__}: {e}"}),
                      flush=True)


def check(recipe: str, src: Path, tmp: Path, device: str) -> None:
    import bitsmith
    from bitsmith.compress.checkpoint import CheckpointReader
    from bitsmith.compress.formats import get_format
    from bitsmith.compress.sources import CheckpointSource

    outs = {}
    for tag, dev in (("ref", "cpu"), ("dev", device)):
        outs[tag] = tmp / f"{Path(recipe).stem}-{tag}"
        bitsmith.compress(recipe, src, outs[tag], device=dev, progress=False)
    a, b = CheckpointReader(outs["ref"]), CheckpointReader(outs["dev"])
    same = sum(torch.equal(a.get(n), b.get(n)) for n in a.tensors)
    worst = 0.0
    mods = CheckpointSource(a).view.packed_modules
    for mod, entry in mods.items():
        fmt = get_format(entry["format"])
        specs = fmt.tensor_specs(entry, torch.bfloat16)
        ta = {k: a.get(f"{mod}.{k}") for k in specs}
        tb = {k: b.get(f"{mod}.{k}") for k in specs}
        if all(torch.equal(ta[k], tb[k]) for k in specs):
            continue
        wa, wb = fmt.dequantize(ta, entry).float(), fmt.dequantize(tb, entry).float()
        worst = max(worst, float((wa - wb).abs().max() / wa.abs().max().clamp_min(1e-12)))
    packed_names = {f"{m}.{k}" for m, e in mods.items()
                    for k in get_format(e["format"]).tensor_specs(e, torch.bfloat16)}
    for n in a.tensors:
        if n not in packed_names and a.get(n).is_floating_point() and not torch.equal(a.get(n), b.get(n)):
            x, y = a.get(n).float(), b.get(n).float()
            worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-12)))
    print(json.dumps({"recipe": recipe, "device": device, "tensors": len(a.tensors),
                      "identical": same, "packed_modules": len(mods),
                      "max_rel_weight_diff": worst}), flush=True)


if __name__ == "__main__":
    main()
