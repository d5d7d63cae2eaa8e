"""End-to-end decode speed of a Llama-shaped model: fp16 weights versus bitsmith-packed ones, one harness for all.

    bitsmith bench generate --shape 1b --shape 8b --batch 1 --batch 16 --variant fp16 --variant w4 --variant w8

For each shape (Llama-3.2-1B or Llama-3-8B layer shapes) and variant, a model with random weights is built on the
GPU (speed does not depend on the values): `fp16` keeps every Linear as it is; `w4` / `w8` replace every decoder
Linear (not the head) by a `PackedLinear` of the gwint format (int4 with fp16 scales per 128 inputs / int8 with one
scale per output row) holding random codes, exactly what `bitsmith compress finequant-w4 / int8` would store.
`w4g64`: int4 with a scale per 64 inputs, the group size the `finequant-w4` recipe (group_size auto at 4.25 bits)
chooses for most matrices.
`w4-h8` / `w4-h4` also pack the lm_head (int8 per row / int4 g128): separate, clearly labelled variants, since the
passes leave the head out by default (`ignore: lm_head`), so a recipe's checkpoint keeps it in fp16.
With `--compile` the decode step's forward is compiled by `torch.compile` (inductor) first, for every variant
alike; packed Linears enter the compiled graph as opaque custom ops (`bitsmith::gwint_linear`). With `--fuse`
every variant computes q/k/v with one Linear and gate/up with another (`fuse_projections`; packed variants pack
the concatenated matrices), fewer and larger GEMVs. With `--fuse`, each layer's RMSNorms, SiLU-multiply and residual
adds also move into its Linears (`fused_layer`: fused deep-GEMV launches for packed variants at one token, the same
ops unfused elsewhere; `--fuse-layer off` keeps the stock layers); `--fuse-layer both` runs every variant both ways
in one process.
Decoding uses a static KV cache: after a prefill of `--prompt` tokens, one decode step (forward of one token per
sequence, greedy next token written back into the input buffer) is captured into a CUDA graph and replayed
`--steps` times; tokens/s = batch x steps / time. The same code path runs every variant, so the ratio is the
weights' doing. Without CUDA (a smoke test on the CPU) the steps run eagerly, and tiny shapes are available.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

SHAPES = {  # (hidden, MLP, layers, heads, KV heads, vocab)
    "tiny": (64, 128, 2, 4, 2, 256),
    "1b": (2048, 8192, 16, 32, 8, 128256),
    "8b": (4096, 14336, 32, 32, 8, 128256),
}
# (bits, group size (None = one group per row), head: None keeps the fp16 lm_head, else (bits, group size) for it)
VARIANTS = {"fp16": None, "w4": (4, 128, None), "w8": (8, None, None), "w4-h8": (4, 128, (8, None)),
            "w4-h4": (4, 128, (4, 128)), "w4g64": (4, 64, None)}
DEFAULT_VARIANTS = ["fp16", "w4", "w8"]


def build_model(shape: str, device: torch.device, dtype: torch.dtype = torch.float16):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads, kv, vocab = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in fp16 on the device: no float32 copy of 8B weights
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _packed_like(lin: torch.nn.Linear, bits: int, group_size: int | None, gen: torch.Generator):
    """A gwint PackedLinear of lin's shape with random codes and scales (-> module, bytes stored)."""
    from ..compress.formats import get_format
    from .modules import PackedLinear

    N, K = lin.weight.shape
    entry = {"format": "gwint", "format_version": 1, "in_features": K, "out_features": N, "bits": bits,
             "group_size": group_size or K, "symmetric": True}
    dev, dtype = lin.weight.device, lin.weight.dtype
    packed = PackedLinear(entry, dtype, bias=False, device=dev)
    stored = 0
    for suffix, (shape, dt) in get_format("gwint").tensor_specs(packed.params, dtype).items():
        buf = getattr(packed, suffix)
        if dt == torch.int32:
            buf.copy_(torch.randint(-2**31, 2**31 - 1, shape, generator=gen, device=dev, dtype=torch.int32))
        else:  # scales: a weight of about 0.02 at the largest code
            buf.copy_(torch.rand(shape, generator=gen, device=dev).mul_(0.01).add_(0.01).div_(2 ** (bits - 1)).to(dt))
        stored += buf.numel() * buf.element_size()
    return packed, stored


class FusedProjections(torch.nn.Module):
    """One Linear computing several projections of the same input (q/k/v, or gate/up) in one launch.

    The model keeps calling its own projection modules (`FusedPart`s now): the first part called computes every
    projection and keeps the split result; the others return their slices of it, after checking that they are
    given the same input tensor (Llama calls q, k, v, and gate, up, in that order on one input).
    """

    def __init__(self, linear: torch.nn.Module, sizes: list[int]):
        super().__init__()
        self.linear = linear  # [sum(sizes), K]
        self.sizes = sizes
        self._memo = None  # (input, split outputs), between the first part's call and the last one's
        self.norm = None  # (weight, eps): RMSNorm of the input inside the Linear (`fused_layer`)
        self.interleaved = False  # rows reordered for a fused SiLU-multiply (`fused_layer`): no parts then

    def project(self, x: torch.Tensor, i: int) -> torch.Tensor:
        if self.interleaved:
            raise RuntimeError("this fused projection's rows are interleaved: its parts cannot be split off")
        if i == 0:
            if self.norm is None:
                y = self.linear(x)
            else:
                from .fused_ops import fused_linear

                y = fused_linear(x, self.linear, norm=self.norm)
            self._memo = (x, y.split(self.sizes, dim=-1))  # [..., sum] -> views [..., size_i]
        elif self._memo is None or self._memo[0] is not x:
            raise RuntimeError("fused projection parts must be called in order on one input")
        out = self._memo[1][i]
        if i == len(self.sizes) - 1:
            self._memo = None
        return out


class FusedPart(torch.nn.Module):
    def __init__(self, fused: FusedProjections, i: int):
        super().__init__()
        self._fused = (fused,)  # a tuple: not a second registration of the fused module's weights
        self.i = i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused[0].project(x, self.i)


FUSED_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
                ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(model) -> None:
    """Replace each decoder layer's q/k/v and gate/up Linears by one concatenated Linear each (same weights)."""
    for layer in model.model.layers:
        for parent_name, fused_name, names in FUSED_GROUPS:
            parent = getattr(layer, parent_name)
            lins = [getattr(parent, n) for n in names]
            w = torch.cat([lin.weight for lin in lins])  # [sum N_i, K]
            fused_lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                fused_lin.weight.copy_(w)
            fused = FusedProjections(fused_lin, [lin.weight.shape[0] for lin in lins])
            setattr(parent, fused_name, fused)
            for i, n in enumerate(names):
                setattr(parent, n, FusedPart(fused, i))
            del lins, w


def pack_linears(model, bits: int, group_size: int | None, seed: int = 0, head: tuple | None = None) -> int:
    """Replace every decoder Linear (and with `head` = (bits, group size) the lm_head too) by a gwint PackedLinear
    with random codes and scales; returns the bytes stored (decoder Linears only)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    stored = 0
    for layer in model.model.layers:
        parents = [layer.self_attn, layer.mlp]
        parents += [m for p in parents for m in p.children() if isinstance(m, FusedProjections)]
        for parent in parents:
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                packed, n = _packed_like(lin, bits, group_size, gen)
                stored += n
                setattr(parent, name, packed)
                del lin
    if head is not None:
        model.lm_head = _packed_like(model.lm_head, *head, gen)[0]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return stored


@torch.no_grad()
def decode_tokens_per_s(model, batch: int, steps: int, prompt: int = 16, graphs: bool = True,
                        profile: bool = False, compile: str | None = None) -> dict:
    """Decode tokens/s of `model` (see the module docstring). `compile` (a torch.compile backend, e.g. "inductor"):
    the decode step's forward is compiled first (static shapes; the CUDA graph is still this function's own), so
    the small ops between the Linears are fused; packed Linears stay opaque custom ops inside the compiled graph."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen, device=device)
    pos = torch.arange(prompt, device=device)
    logits = model(input_ids=ids, cache_position=pos, past_key_values=cache, use_cache=True).logits  # prefill
    step_ids = logits[:, -1:].argmax(-1)  # [batch, 1]
    step_pos = torch.tensor([prompt], device=device)
    forward = torch.compile(model.forward, backend=compile, dynamic=False) if compile else model.forward
    t_compile = time.perf_counter()

    def step() -> None:
        out = forward(input_ids=step_ids, cache_position=step_pos, past_key_values=cache, use_cache=True).logits
        step_ids.copy_(out[:, -1:].argmax(-1))
        step_pos.add_(1)

    use_graph = graphs and device.type == "cuda"
    if use_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: kernel compilation and tuning happen outside the capture
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        t_compile = time.perf_counter() - t_compile  # warm-up time: compilation (with `compile`) and tuning
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
        step_pos.fill_(prompt)  # restart positions: the warm-up and capture wrote nothing the replays depend on
        graph.replay()
        torch.cuda.synchronize()
        run = graph.replay
    else:
        step()
        t_compile = time.perf_counter() - t_compile
        run = step
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    seconds = time.perf_counter() - t0
    res = {"batch": batch, "steps": steps, "seconds": round(seconds, 4), "graphs": use_graph,
           "tokens_per_s": round(batch * steps / seconds, 1), "ms_per_step": round(1e3 * seconds / steps, 3),
           "compiled": compile, "warmup_s": round(t_compile, 1)}
    if profile and device.type == "cuda":
        res["profile"] = _profile_step(run, sync)
    return res


def kernel_category(name: str) -> str:
    """Coarse class of a GPU kernel by its name: where a decode step's time goes."""
    n = name.lower()
    for cat, keys in (("gwint", ("_gemv", "_gemm_kernel", "_gemm_t_kernel", "_xperm", "_dequant_kernel")),
                      ("attention", ("flash", "attention", "sdpa", "fmha", "softmax")),
                      ("cublas-gemm", ("gemm", "gemv", "sm90_xmma", "cutlass", "nvjet", "splitk"))):
        if any(k in n for k in keys):
            return cat
    return "other"


def _profile_step(run, sync, steps: int = 3) -> dict:
    """GPU kernel time per decode step by kernel category and the top kernels (torch.profiler over `steps`
    replays; kernels inside a CUDA graph are reported one by one)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        sync()
    per_cat: dict[str, float] = {}
    per_kernel: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        cat = kernel_category(ev.name)
        per_cat[cat] = per_cat.get(cat, 0.0) + us / steps
        k = per_kernel.setdefault(ev.name[:80], [0.0, 0])
        k[0] += us / steps
        k[1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:12]
    return {"us_per_step": {k: round(v, 1) for k, v in sorted(per_cat.items())},
            "launches_per_step": sum(v[1] for v in per_kernel.values()) / steps,
            "top": [{"kernel": k, "us_per_step": round(v[0], 1), "launches_per_step": v[1] / steps}
                    for k, v in top]}


def _enable_pdl() -> None:
    """Programmatic dependent launch for inductor's generated kernels and the gwint GEMVs (see `--pdl`)."""
    import torch._inductor.config as inductor_config

    from . import gwint_triton

    if not hasattr(inductor_config.triton, "enable_pdl"):
        raise SystemExit("--pdl: this torch's inductor has no triton.enable_pdl option")
    inductor_config.triton.enable_pdl = True
    gwint_triton.PDL = True


def _gwint_tuned() -> list:
    """The gwint kernel configurations tuned so far in this process: [[key, config], ...] (JSON-friendly)."""
    import sys

    gt = sys.modules.get("bitsmith.kernels.gwint_triton")
    return [] if gt is None else [[[str(v) for v in k], c] for k, c in gt._TUNED.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bitsmith bench generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES))
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS))
    ap.add_argument("--batch", action="append", type=int)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--no-graphs", action="store_true", help="time eager steps (no CUDA graph)")
    ap.add_argument("--profile", action="store_true", help="also profile 3 steps: GPU time per kernel category")
    ap.add_argument("--fuse", action="store_true",
                    help="one Linear for q/k/v and one for gate/up in every layer (every variant alike)")
    ap.add_argument("--fuse-layer", nargs="?", const="on", default=None, choices=["on", "off", "both"],
                    help="with --fuse (on by default there): RMSNorms, SiLU-multiply and residual adds inside the "
                         "decoder Linears (bitsmith.kernels.fused_layer; every variant alike, fused kernels for "
                         "packed ones); 'off': the stock layers; 'both': every variant with the stock layers, then "
                         "fused, in this process (one tuner)")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="torch.compile the decode step's forward (every variant alike) before the CUDA graph "
                         "(backend: inductor unless named)")
    ap.add_argument("--pdl", action="store_true",
                    help="programmatic dependent launch (Hopper+), every variant alike: inductor's kernels "
                         "(torch._inductor.config.triton.enable_pdl) and the gwint M=1 GEMVs (gwint_triton.PDL)")
    ap.add_argument("--device", default=None, help="default: cuda when available")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.fuse_layer in ("on", "both") and not args.fuse:
        ap.error("--fuse-layer needs --fuse")
    if args.fuse_layer is None:  # default: fused layers wherever the projections are fused (8B batch 1 w4: 2.22x
        args.fuse_layer = "on" if args.fuse else "off"  # fp16 against 2.10x stock, one process; generate.md)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.pdl:
        _enable_pdl()
    rows = []
    layer_modes = [False, True] if args.fuse_layer == "both" else [args.fuse_layer == "on"]
    for shape in args.shape or ["1b", "8b"]:
        for variant, fuse_layer in [(v, m) for v in args.variant or DEFAULT_VARIANTS for m in layer_modes]:
            if args.compile:
                torch._dynamo.reset()  # a fresh compile per model: guards on the last model's modules would pile up
            model = build_model(shape, device)
            if args.fuse:
                fuse_projections(model)
            if fuse_layer:
                from .fused_layer import fuse_decoder_layers

                fuse_decoder_layers(model)
            stored = None
            if VARIANTS[variant] is not None:
                bits, gs, head = VARIANTS[variant]
                stored = pack_linears(model, bits, gs, head=head)
            for batch in args.batch or [1, 16]:
                try:
                    res = decode_tokens_per_s(model, batch, args.steps, args.prompt, graphs=not args.no_graphs,
                                              profile=args.profile, compile=args.compile)
                except Exception as e:  # one failing row must not hide the others
                    res = {"batch": batch, "error": f"{type(e).__name__}: {e}"[:500]}
                row = {"shape": shape, "variant": variant, "fused": args.fuse, "fuse_layer": fuse_layer,
                       "pdl": args.pdl,
                       "decoder_linear_bytes": stored, **res,
                       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
                if stored is not None:
                    row["gwint_tuned"] = _gwint_tuned()
                rows.append(row)
                print(json.dumps(row), flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    key = lambda r: (r["shape"], r["batch"], r["fuse_layer"])  # noqa: E731
    base = {key(r): r.get("tokens_per_s") for r in rows if r["variant"] == "fp16"}
    for r in rows:
        b = base.get(key(r))
        if b and r.get("tokens_per_s"):
            r["speedup_vs_fp16"] = round(r["tokens_per_s"] / b, 2)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(json.dumps([{k: r.get(k) for k in ("shape", "variant", "fuse_layer", "batch", "tokens_per_s",
                                             "speedup_vs_fp16")}
                      for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
