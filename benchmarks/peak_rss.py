"""Peak memory of `bitsmith compress` on a synthetic Llama-shaped checkpoint generated on disk.

    python benchmarks/peak_rss.py --workdir /tmp/rss --size-gb 4 --recipe int8

Generates random bf16 weights of real Llama shapes (sized to about --size-gb), sharded like the Hub does, then runs
the CLI in a child process and reports its peak resident set size, wall time and input throughput.
The synthetic folder is deleted afterwards unless --keep.

Measurement note: the peak is the compress child's own ru_maxrss, read with os.wait4 on that child alone
(RUSAGE_CHILDREN would report the largest of all children, the generator included). Linux also carries a process's
high-water RSS across fork+exec into the child, so this parent never imports torch (it stays a few tens of MB) and
the generation runs in a child of its own.
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


def generate(folder: Path, size_gb: float, shard_gb: float = 1.0) -> int:
    import torch
    from safetensors.torch import save_file

    hidden, intermediate, vocab = 2560, 6912, 32000
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * intermediate)
    layers = max(1, int((size_gb * 1e9 - 4 * vocab * hidden) / per_layer))
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": 20,
              "num_key_value_heads": 20, "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    # Lay the shards out from the shapes first, then generate and save one shard at a time (memory: one shard).
    layout: list[list[tuple[str, tuple]]] = [[]]
    size = total = 0
    for name, shape in llama_shapes(hidden, intermediate, layers, vocab):
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
        shard = {name: (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16) if len(shape) == 2
                 else torch.ones(shape, dtype=torch.bfloat16) for name, shape in entries}
        save_file(shard, folder / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--recipe", default="int8")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to bitsmith compress")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--generate-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate_only:
        print(generate(args.generate_only, args.size_gb))
        return
    src, out = args.workdir / "synthetic", args.workdir / "out"
    shutil.rmtree(args.workdir, ignore_errors=True)
    t0 = time.time()
    gen = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--size-gb", str(args.size_gb),
                          "--generate-only", str(src)], capture_output=True, text=True, check=True)
    total = int(gen.stdout.strip().splitlines()[-1])
    print(f"generated {total / 1e9:.2f} GB in {time.time() - t0:.0f} s", flush=True)
    cmd = [sys.executable, "-m", "bitsmith.cli", "compress", args.recipe, str(src), "-o", str(out), "--no-progress"]
    for o in args.overrides:
        cmd += ["--set", o]
    t0 = time.time()
    log = open(args.workdir / "compress.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        log.seek(0)
        sys.exit(f"compress failed:\n{log.read()}")
    peak_kb = usage.ru_maxrss
    out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    result = {"input_gb": round(total / 1e9, 3), "output_gb": round(out_bytes / 1e9, 3), "recipe": args.recipe,
              "overrides": args.overrides,
              "peak_rss_gb": round(peak_kb * 1024 / 1e9, 3), "seconds": round(wall, 1),
              "input_gb_per_s": round(total / 1e9 / wall, 3)}
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
