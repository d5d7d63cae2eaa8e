"""A model pass on 2 ranks vs 1: activation-aware block_sparse (+ least-squares refit) of a ~1B Llama, timed, with
the sha256 of every output file compared.

    # on nvidia-h200-x2 (one call; the model is built on the machine, nothing is downloaded)
    python3 benchmarks/scale/model_pass_2gpu.py --workdir /root/mp2 --out $OUT
    # here, on the CPU (gloo, tiny shapes): the same steps end to end
    python benchmarks/scale/model_pass_2gpu.py --cpu --workdir /tmp/mp2 --out /tmp/mp2/out

Steps: (1) a child process builds a Llama of the chosen shape with random bf16 weights (`1b`: hidden 2048, MLP 8192,
16 layers, 32 heads / 8 KV heads, 0.97B parameters with the 256-token vocabulary) and a byte-level tokenizer (256
tokens, no merges: no Hub download) and saves both with transformers; (2) the recipe (written next to it) runs
with 1 rank (`CUDA_VISIBLE_DEVICES=0 python -m bitsmith.cli compress ... --device cuda`), then with 2 ranks
(`torchrun --standalone --nproc_per_node 2 -m bitsmith.cli compress ... --device cuda`: nccl, each rank on
cuda:LOCAL_RANK) and, with --accelerate, with `accelerate launch --multi_gpu --num_processes 2`; (3) for each run:
the whole CLI's wall time measured from outside, the pass's own time and its calibration time from its log line,
the sweep's time from the CLI's JSON summary; the sha256 of every output file, compared with the 1-rank run.
Calibration text: the sample bundled with bitsmith (a chapter of Persuasion, 36 KB = 36k byte tokens).

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set
for every child). torchrun gives each rank OMP_NUM_THREADS=1 unless set: on the GPU this script sets it to
cores / ranks for the multi-rank runs (the CPU parts: reading, model construction, writing) and leaves the 1-rank
run at torch's default; with --cpu every run gets 1 thread (the same CPU kernels in every process).

Writes under --out: model_pass_2gpu.json (everything), model_pass_2gpu.txt (a short table), log_<run>.txt (each
run's stderr), <run>.sha256 (one line per output file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # name -> (hidden, intermediate, layers, heads, kv heads)
    "1b": (2048, 8192, 16, 32, 8),
    "small": (256, 512, 4, 8, 4),
    "tiny": (64, 128, 3, 4, 2),
}
RECIPE = """\
version: 1
name: block-sparse-activation-refit
passes:
  - type: block_sparse
    sparsity: {sparsity}
    block: [{block}, {block}]
    score: activation
    scope: layer
    refit: true
    samples: {samples}
    seq_len: {seq_len}
    batch_size: {batch_size}
"""
PASS_LINE = re.compile(r"block_sparse: .*?; ([\d.]+) s \(calibration ([\d.]+) s\)(?: on (\d+) ranks)?")
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def build(folder: Path, shape: str) -> None:
    """A random bf16 Llama of `shape` with a byte-level tokenizer, saved in `folder` (run in a child process)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, inter, layers, heads, kv = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, vocab_size=256,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):  # random initialization on the GPU when there is one (seconds, not minutes)
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.to("cpu").save_pretrained(folder, max_shard_size="1GB")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": n, "shape": shape}))


def digests(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
            out[p.name] = h.hexdigest()
    return out


def run_cli(name: str, launcher: list[str], cli_args: list[str], env: dict, out_dir: Path) -> dict:
    cmd = [*launcher, "-m", "bitsmith.cli", "-v", "compress", *cli_args, "--json"]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    (out_dir / f"log_{name}.txt").write_text(" ".join(cmd) + "\n\n" + r.stderr)
    rec = {"run": name, "command": " ".join(cmd), "rc": r.returncode, "cli_wall_s": round(wall, 2)}
    m = PASS_LINE.search(r.stderr)
    if m:
        rec["pass_s"], rec["calibration_s"] = float(m.group(1)), float(m.group(2))
        rec["ranks_in_pass"] = int(m.group(3) or 1)  # what the pass itself saw
        rec["pass_log"] = m.group(0)
    try:
        summary = json.loads(r.stdout[r.stdout.index("{"):])
        rec["summary_seconds"] = summary.get("seconds")
        rec["output_bytes"] = summary.get("output_bytes")
    except ValueError:
        rec["stdout_tail"] = r.stdout[-2000:]
    if r.returncode != 0:
        rec["stderr_tail"] = r.stderr[-4000:]
    print(f"[{name}] rc {r.returncode}, {wall:.1f} s wall, pass {rec.get('pass_s')} s", flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="model and outputs go here (deleted unless --keep)")
    ap.add_argument("--out", type=Path, default=None, help="summary files (default: $OUT, else WORKDIR/summary)")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU with tiny shapes: to check the script")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: 1b, or tiny with --cpu")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--accelerate", action="store_true", help="also run under accelerate launch")
    ap.add_argument("--samples", type=int, default=None, help="calibration sequences (default 64, 10 with --cpu)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 512, 32 with --cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8, 2 with --cpu")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = args.shape or ("tiny" if args.cpu else "1b")
    if args.build is not None:
        build(args.build, shape)
        return

    work = args.workdir
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else work / "summary")
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo / "src"), env.get("PYTHONPATH", "")) if p)
    cores = os.cpu_count() or 1

    src = work / f"llama-{shape}"
    t0 = time.perf_counter()
    if not (src / "config.json").exists():
        r = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--shape", shape, "--build", str(src)],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"building the model failed:\n{r.stderr[-3000:]}")
        built = json.loads(r.stdout.strip().splitlines()[-1])
    else:
        built = {"shape": shape, "parameters": None}
    build_s = time.perf_counter() - t0
    samples = args.samples or (10 if args.cpu else 64)
    seq_len = args.seq_len or (32 if args.cpu else 512)
    batch_size = args.batch_size or (2 if args.cpu else 8)
    recipe = work / "recipe.yaml"
    recipe.write_text(RECIPE.format(sparsity=args.sparsity, block=args.block, samples=samples, seq_len=seq_len,
                                    batch_size=batch_size))
    device = [] if args.cpu else ["--device", "cuda"]
    runs = [("one", [sys.executable], {"CUDA_VISIBLE_DEVICES": "0"} if not args.cpu else {}, 1)]
    per_rank = "1" if args.cpu else str(max(1, cores // args.nproc))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
    runs.append((f"torchrun{args.nproc}", torchrun, {"OMP_NUM_THREADS": per_rank}, args.nproc))
    if args.accelerate:
        acc = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.nproc), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29581"]
        runs.append((f"accelerate{args.nproc}", acc, {"OMP_NUM_THREADS": per_rank}, args.nproc))
    if args.cpu:
        for _, _, extra, _ in runs:
            extra["OMP_NUM_THREADS"] = "1"

    records, sums = [], {}
    for name, launcher, extra, ranks in runs:
        dst = work / f"out_{name}"
        shutil.rmtree(dst, ignore_errors=True)
        rec = run_cli(name, launcher, [str(recipe), str(src), "-o", str(dst), "--no-progress", *device],
                      {**env, **extra}, out_dir)
        rec["ranks"] = ranks
        rec["env"] = extra
        if rec["rc"] == 0:
            sums[name] = digests(dst)
            (out_dir / f"{name}.sha256").write_text("".join(f"{h}  {n}\n" for n, h in sums[name].items()))
            rec["files"] = len(sums[name])
            if name != "one" and "one" in sums:
                diff = sorted(n for n in set(sums["one"]) | set(sums[name])
                              if sums["one"].get(n) != sums[name].get(n))
                rec["identical_to_one"] = not diff
                rec["differing_files"] = diff
        records.append(rec)
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)

    import platform

    info = {"shape": shape, "dims": SHAPES[shape], "parameters": built.get("parameters"), "build_s": round(build_s, 1),
            "recipe": recipe.read_text(), "cpu_mode": args.cpu, "host": platform.node(), "cores": cores,
            "python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    result = {"info": info, "runs": records}
    (out_dir / "model_pass_2gpu.json").write_text(json.dumps(result, indent=2))
    lines = [f"{shape} {SHAPES[shape]} ({built.get('parameters')} parameters), block_sparse activation + refit,"
             f" {samples} x {seq_len} calibration tokens in batches of {batch_size}",
             "| run | ranks (pass saw) | CLI wall s | pass s | calibration s | run() s (summary) | identical to 1 rank |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for rec in records:
        same = "(reference)" if rec["run"] == "one" else rec.get("identical_to_one", f"rc {rec['rc']}")
        lines.append(f"| {rec['run']} | {rec['ranks']} ({rec.get('ranks_in_pass')}) | {rec['cli_wall_s']} | {rec.get('pass_s')} |"
                     f" {rec.get('calibration_s')} | {rec.get('summary_seconds')} | {same} |")
    (out_dir / "model_pass_2gpu.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
    ok = all(r["rc"] == 0 and r.get("ranks_in_pass") == r["ranks"] and r.get("identical_to_one", True)
             for r in records)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
