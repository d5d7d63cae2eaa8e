"""Peak memory and throughput of `bitsmith compress` on a synthetic Llama-shaped checkpoint generated on disk.

    python benchmarks/peak_rss.py --workdir /tmp/rss --size-gb 4 --recipe int8
    python benchmarks/peak_rss.py --workdir /data/scale --shape llama3-8b --size-gb 32 \
        --recipe finequant-w4 --recipe bipolar-w3 --json-out results.jsonl          # one folder, several recipes
    python benchmarks/peak_rss.py --workdir /data/scale --shape llama3-8b --layers 32 --recipe finequant-w4 --device cuda

Generates random bf16 weights of real Llama shapes (`llama-small`: hidden 2560 / MLP 6912 / vocab 32000, MHA;
`llama3-8b`: hidden 4096 / MLP 14336 / 8 KV heads of 32 / vocab 128256), as many layers as fit in --size-gb (or
exactly --layers), sharded like the Hub does (one shard generated at a time), then runs the CLI once per --recipe in
a child process and reports its peak resident set size, wall time and input throughput (GB of input checkpoint per
second, the whole run: reading, passes, writing). The synthetic folder is deleted afterwards unless --keep.

Measurement note: the peak is the compress child's own ru_maxrss, read with os.wait4 on that child alone
(RUSAGE_CHILDREN would report the largest of all children, the generator included). Linux also carries a process's
high-water RSS across fork+exec into the child, so this parent never imports torch (it stays a few tens of MB) and
the generation runs in a child of its own. Random weights: quantizer timings do not depend on the values much, but
the clipping search and the group-size choice see Gaussian weights, not trained ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # name -> (hidden, intermediate, vocab, attention heads, KV heads)
    "llama-small": (2560, 6912, 32000, 20, 20),
    "llama3-8b": (4096, 14336, 128256, 32, 8),
}


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv_heads_ratio: int = 1):
    kv = hidden // kv_heads_ratio
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.self_attn.q_proj.weight", (hidden, hidden)
        yield f"{p}.self_attn.k_proj.weight", (kv, hidden)
        yield f"{p}.self_attn.v_proj.weight", (kv, hidden)
        yield f"{p}.self_attn.o_proj.weight", (hidden, hidden)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
        yield f"{p}.mlp.gate_proj.weight", (intermediate, hidden)
        yield f"{p}.mlp.up_proj.weight", (intermediate, hidden)
        yield f"{p}.mlp.down_proj.weight", (hidden, intermediate)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def generate(folder: Path, size_gb: float, arch: str = "llama-small", layers: int | None = None,
             shard_gb: float = 5.0) -> int:
    import torch
    from safetensors.torch import save_file

    hidden, intermediate, vocab, heads, kv_heads = SHAPES[arch]
    ratio = heads // kv_heads
    kv = hidden // ratio
    per_layer = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate)
    if layers is None:
        layers = max(1, int((size_gb * 1e9 - 4 * vocab * hidden) / per_layer))
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # Lay the shards out from the shapes first, then generate and save one shard at a time (memory: one shard).
    layout: list[list[tuple[str, tuple]]] = [[]]
    size = total = 0
    for name, shape in llama_shapes(hidden, intermediate, layers, vocab, ratio):
        n = 2
        for d in shape:
            n *= d
        if size and size + n > shard_gb * 1e9:
            layout.append([])
            size = 0
        layout[-1].append((name, shape))
        size += n
        total += n
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, entries in enumerate(layout):
        fname = f"model-{i + 1:05d}-of-{len(layout):05d}.safetensors"
        shard = {name: torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16) if len(shape) == 2
                 else torch.ones(shape, dtype=torch.bfloat16) for name, shape in entries}
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return total


def compress_once(src: Path, out: Path, recipe: str, args) -> dict:
    cmd = [sys.executable, "-m", "bitsmith.cli", "compress", recipe, str(src), "-o", str(out), "--no-progress",
           "--device", args.device, "--workers", str(args.workers), "--overwrite"]
    for o in args.overrides:
        cmd += ["--set", o]
    t0 = time.time()
    log_path = out.parent / f"compress-{Path(recipe).stem}.log"
    with open(log_path, "w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
        wall = time.time() - t0
        if os.waitstatus_to_exitcode(status) != 0:  # reported, and the next recipe still runs
            log.seek(0)
            return {"recipe": recipe, "device": args.device, "error": log.read()[-3000:]}
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    with open(log_path) as log:
        tail = log.read()[-400:]
    return {"input_gb": round(total / 1e9, 3), "output_gb": round(out_bytes / 1e9, 3), "recipe": recipe,
            "overrides": args.overrides, "device": args.device, "workers": args.workers,
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3), "seconds": round(wall, 1),
            "input_gb_per_s": round(total / 1e9 / wall, 3), "cpu_user_s": round(usage.ru_utime, 1),
            "load_avg_1m_after": round(os.getloadavg()[0], 1), "log_tail": tail}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-small")
    ap.add_argument("--layers", type=int, default=None, help="exact layer count (overrides --size-gb)")
    ap.add_argument("--recipe", action="append", default=None, help="bundled name or YAML path; repeatable")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to bitsmith compress (to every recipe)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--source", type=Path, default=None, help="use this existing folder instead of generating one")
    ap.add_argument("--json-out", type=Path, default=None, help="append one JSON line per recipe here")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--generate-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        print(generate(args.generate_only, args.size_gb, args.shape, args.layers))
        return
    recipes = args.recipe or ["int8"]
    if args.source:
        src = args.source
    else:
        src = args.workdir / "synthetic"
        shutil.rmtree(args.workdir, ignore_errors=True)
        t0 = time.time()
        cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--size-gb", str(args.size_gb), "--shape",
               args.shape, "--generate-only", str(src)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        gen = subprocess.run(cmd, capture_output=True, text=True)
        if gen.returncode:
            sys.exit(f"generation failed:\n{gen.stderr[-4000:]}")
        total = int(gen.stdout.strip().splitlines()[-1])
        print(json.dumps({"generated_gb": round(total / 1e9, 2), "shape": args.shape,
                          "seconds": round(time.time() - t0, 1)}), flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        for recipe in recipes:
            out = args.workdir / f"out-{Path(recipe).stem}"
            result = {"shape": args.shape, **compress_once(src, out, recipe, args)}
            print(json.dumps(result), flush=True)
            if args.json_out:
                with open(args.json_out, "a") as f:
                    f.write(json.dumps(result) + "\n")
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not args.keep and not args.source:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
