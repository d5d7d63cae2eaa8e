"""Nearest vs GPTQ rounding for finequant, bipolar and bcq: held-out perplexity, bits per weight, calibration time and
peak memory. One configuration per invocation (so the peak RSS is that configuration's own), rows appended as JSON.

    python benchmarks/calibrated_quality.py --model ~/.cache/bitsmith/examples/smollm2-135m --config fq4-gptq \
        --calib /work/shared/data/austen/prideprejudice.txt --eval /work/shared/data/austen/persuasion.txt \
        --tokens 8192 --window 1024 --samples 32 --seq-len 512 --out docs/results/calibrated.jsonl

`--config bf16` evaluates the input model (float32 compute); `--list` prints the configurations. Everything runs in
float32 on the device given (default cpu) with `torch.set_num_threads(--threads)`.

`--synthetic CONFIG_JSON` times calibrate + quantize only (no evaluation) on a model built from that config.json
with random bf16 weights, calibrated on random token ids (for a GPU machine the real weights cannot reach):

    python benchmarks/calibrated_quality.py --synthetic gemma3-270m.config.json --config fq4-gptq --device cuda \
        --samples 128 --seq-len 512
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# name -> (pass body without rounding, description)
CONFIGS = {
    "fq4": ("type: finequant\n    bits: 4\n    group_size: auto\n    bits_budget: 4.25\n    clip_search: true",
            "finequant int4, group_size auto within 4.25 bits, clip search (the finequant-w4 recipe)"),
    "fq3": ("type: finequant\n    bits: 3\n    group_size: auto\n    bits_budget: 3.25\n    clip_search: true",
            "finequant int3, group_size auto within 3.25 bits, clip search (the finequant-w3 recipe)"),
    "bp4": ("type: bipolar\n    bits: 4\n    group_size: 128", "bipolar-INT 4-bit g128, scale search"),
    "bp3": ("type: bipolar\n    bits: 3\n    group_size: 128", "bipolar-INT 3-bit g128, scale search"),
    "bcq4": ("type: bcq\n    bits: 4\n    group_size: 128", "BCQ 4 planes g128 (ALS, init both)"),
    "bcq3": ("type: bcq\n    bits: 3\n    group_size: 128", "BCQ 3 planes g128 (ALS, init both)"),
}


def recipe_for(name: str, calib: str, samples: int, seq_len: int, seed: int, act_order: bool) -> tuple[str, str]:
    base, _, rounding = name.partition("-")
    body, desc = CONFIGS[base]
    text = f"version: 1\npasses:\n  - {body}\n    targets: [Linear]\n    ignore: [lm_head]\n"
    if rounding == "gptq":
        text += (f"    rounding: gptq\n    act_order: {str(act_order).lower()}\n"
                 f"    calibration: {{text: {json.dumps(calib)}, samples: {samples}, seq_len: {seq_len},"
                 f" seed: {seed}}}\n")
        desc += f"; rounding gptq (damp 0.01, block 128, act_order {act_order}), calibration {samples}x{seq_len}" \
                f" tokens of {Path(calib).name if calib else 'random token ids'}, seed {seed}"
    else:
        desc += "; rounding nearest"
    return text, desc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--config", help="bf16, or NAME[-gptq] with NAME in " + ", ".join(CONFIGS))
    ap.add_argument("--calib", default=None, help="calibration text file")
    ap.add_argument("--eval", dest="eval_text", default=None, help="held-out text file")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="append one JSON row here")
    ap.add_argument("--team", type=Path, default=None, help="also append the team-protocol row here")
    ap.add_argument("--keep", type=Path, default=None, help="keep the compressed folder here")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--synthetic", type=Path, default=None, help="config.json: random weights, random token ids")
    args = ap.parse_args(argv)
    if args.list:
        for k, (_, d) in CONFIGS.items():
            print(f"{k}: {d}")
        return 0
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.synthetic is not None:
        return synthetic(args)
    from bitsmith.api import compress
    from bitsmith.compress.evaluate import evaluate_path
    from bitsmith.compress.recipe import parse_recipe

    model = args.model.expanduser()
    row: dict = {"model": model.name, "config": args.config, "tokens": args.tokens, "window": args.window,
                 "text": Path(args.eval_text).name, "device": args.device, "threads": args.threads}
    work = Path(tempfile.mkdtemp(prefix="calq-"))
    try:
        path = model
        if args.config != "bf16":
            yaml_text, desc = recipe_for(args.config, args.calib, args.samples, args.seq_len, args.seed,
                                         args.act_order)
            t0 = time.time()
            summary = compress(parse_recipe(yaml_text, args.config), model, work / "out", device=args.device,
                               progress=False)
            row["compress_seconds"] = round(time.time() - t0, 1)
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            if args.device.startswith("cuda"):
                row["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            weights = summary.linear_bytes_before / 2  # bf16 input: 2 bytes per targeted weight
            row["bits_per_weight"] = round(summary.linear_bytes_after * 8 / weights, 4)
            row["description"] = desc
            row["recipe"] = yaml_text
            path = work / "out"
            if args.keep:
                shutil.copytree(path, args.keep, dirs_exist_ok=True)
        else:
            row["bits_per_weight"] = 16.0
            row["description"] = "bf16 weights, float32 compute"
        res = evaluate_path(path, args.eval_text, max_tokens=args.tokens, window=args.window, device=args.device,
                            dtype=torch.float32, progress=False)
        row.update({"ppl": round(res["ppl"], 4), "bits_per_char": round(res["bits_per_char"], 5),
                    "eval_tokens": res["tokens"], "eval_seconds": res["seconds"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row["command"] = "python " + " ".join(sys.argv)
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.team:
        team = {k: row[k] for k in ("model", "bits_per_weight", "ppl", "bits_per_char", "tokens", "window", "text",
                                    "command")}
        team["config"] = row.get("description", args.config)
        team["who"] = "issue12 (gptq)"
        with open(args.team, "a") as f:
            f.write(json.dumps(team) + "\n")
    return 0


def synthetic(args) -> int:
    """Calibrate + quantize a random-weight model of a real config; print one JSON row of times and memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitsmith.compress.passes import handler_for
    from bitsmith.compress.pipeline import PassContext
    from bitsmith.compress.recipe import parse_recipe
    from bitsmith.quant.gptq import TOKENS_KEY

    cfg_dict = json.loads(args.synthetic.read_text())
    cfg_dict.pop("quantization_config", None)
    hf_config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    torch.manual_seed(args.seed)
    t0 = time.time()
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    build = time.time() - t0
    g = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, hf_config.get_text_config().vocab_size, (args.samples, args.seq_len), generator=g)
    yaml_text, desc = recipe_for(args.config, None, args.samples, args.seq_len, args.seed,
                                 args.act_order)
    cfg = parse_recipe(yaml_text, args.config).passes[0]
    ctx = PassContext(device=args.device, progress=False)
    ctx.extra[TOKENS_KEY] = tokens
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    packed = handler_for(cfg).apply(cfg, model, ctx)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    secs = time.time() - t0
    report = ctx.extra["gptq.report"][0]
    row = {"synthetic": args.synthetic.name, "config": args.config, "description": desc, "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "samples": args.samples, "seq_len": args.seq_len, "weights_packed": len(packed),
           "calibrate_quantize_seconds": round(secs, 2), "build_seconds": round(build, 2),
           "peak_mb": report["peak_mb"], "layer_seconds": [p[1] for p in report["per_layer"]],
           "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
