"""GPU benchmark harness for the packed-format kernels: CUDA-graph timing with a cold L2, peers in the same run.

Timing (`graph_time_us`): the call under test is made once per rotated input set (each set: its own weights and
activations; enough sets that together they exceed the L2 several times over, so every call reads its weights
from HBM), all captured round-robin into one CUDA graph; the graph is replayed many times and the median replay
time is divided by the number of calls in it. cuBLAS fp16 (`torch.nn.functional.linear`) and the peers are timed
the same way in the same process; a device-to-device copy gives the bandwidth ceiling of this run.

Reusable for other formats: a format is an object with `name`, `make(N, K, dtype, device, gen) -> weights`,
`call(x, weights)`, `reference(x, weights)` and `nbytes(weights)` (see `GwintFormat`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import gwint
from .launch import median_replay_ms


def tee_log(out_dir: str, name: str = "bench.log") -> Callable[[str], None]:
    """A log function that prints each message and appends it to `out_dir`/`name`, flushed per line, so that a run
    cut by its time limit keeps everything it logged."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, name), "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        f.write(msg + "\n")
        f.flush()

    return log


# ---------------------------------------------------------------------------------------------------- timing

def l2_bytes(device: torch.device | int | None = None) -> int:
    return torch.cuda.get_device_properties(device or torch.cuda.current_device()).L2_cache_size


def rotations(set_bytes: int, device=None, factor: float = 3.0, most: int = 64) -> int:
    """How many input sets, each of `set_bytes`, make the working set `factor` times the L2."""
    return max(2, min(most, math.ceil(factor * l2_bytes(device) / max(set_bytes, 1))))


def graph_time_us(calls: list[Callable[[], object]], min_calls: int = 32, replays: int = 15) -> float:
    """Median microseconds per call over CUDA-graph replays; `calls` are the same op on rotated input sets."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compile, tune, workspaces) on the capture stream, outside capture
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    reps = max(1, math.ceil(min_calls / len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(reps):
            for c in calls:
                c()
    ms = median_replay_ms(graph, replays)
    del graph
    return ms * 1e3 / (reps * len(calls))


def cublas_baseline(N: int, K: int, ms: Iterable[int], dtype: torch.dtype, gen: torch.Generator, rows: list[dict],
                    log: Callable[[str], None]) -> dict[int, float]:
    """cuBLAS (`F.linear`) microseconds per call of x [M, K] @ W^T, W random [N, K] on `gen`'s device, for each M
    in `ms`, timed like the formats (rotated input sets); appends a row `cublas-fp16` and logs a line per M."""
    sets = rotations(N * K * 2)
    ws = [torch.randn(N, K, device=gen.device, dtype=dtype, generator=gen) for _ in range(sets)]
    base = {}
    for M in ms:
        xs = [torch.randn(M, K, device=gen.device, dtype=dtype, generator=gen) for _ in range(sets)]
        base[M] = graph_time_us([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)])
        rows.append(dict(kernel="cublas-fp16", N=N, K=K, M=M, us=base[M], speedup=1.0))
        log(f"{N}x{K} M={M} cuBLAS fp16 {base[M]:.1f} us")
    del ws
    torch.cuda.empty_cache()
    return base


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + bytes written per second (GB/s)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    us = graph_time_us([lambda: b.copy_(a)], min_calls=10, replays=15)
    return 2 * nbytes / us / 1e3


# ---------------------------------------------------------------------------------------------------- formats

@dataclass(frozen=True)
class GwintFormat:
    """A gwint configuration on synthetic random codes (real shapes, random weights)."""

    name: str
    bits: int
    group_size: int | None  # None: per output channel (group_size = K)
    sym: bool = True

    def gs(self, K: int) -> int:
        return self.group_size or K

    def make(self, N: int, K: int, dtype: torch.dtype, device, gen: torch.Generator) -> dict:
        bits, P, gs = self.bits, 32 // self.bits, self.gs(K)
        G = gwint.num_groups(K, gs)
        if 32 % bits == 0 and K % P == 0:  # every slot of every word is a code: random words are random codes
            qweight = torch.randint(0, 1 << 32, (K // P, N), dtype=torch.int64, device=device, generator=gen)
            qweight = qweight.to(torch.int32)
        else:
            codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, device=device, generator=gen)
            qweight = gwint.pack_codes(codes, bits)
        # scales so that outputs are O(1) for unit-variance x, whatever the bits and K
        s0 = 1.0 / ((1 << (bits - 1)) * math.sqrt(K))
        scales = (torch.rand(G, N, device=device, generator=gen) * s0 + 0.5 * s0).to(dtype)
        zeros = None if self.sym else torch.randint(0, 1 << bits, (G, N), dtype=torch.uint8, device=device,
                                                    generator=gen)
        return dict(qweight=qweight, scales=scales, zeros=zeros, bits=bits, group_size=gs, in_features=K)

    @staticmethod
    def call(x: torch.Tensor, w: dict) -> torch.Tensor:
        return gwint.linear(x, w["qweight"], w["scales"], w["zeros"], w["bits"], w["group_size"], w["in_features"])

    @staticmethod
    def reference(x: torch.Tensor, w: dict) -> torch.Tensor:
        wf = gwint.dequantize(w["qweight"], w["scales"], w["zeros"], w["bits"], w["group_size"], w["in_features"],
                              dtype=torch.float32)
        return x.float() @ wf.t()

    @staticmethod
    def nbytes(w: dict) -> int:
        return sum(t.numel() * t.element_size() for k, t in w.items() if isinstance(t, torch.Tensor))


FORMATS = {
    "w4g128": GwintFormat("w4g128", 4, 128),
    "w4g128a": GwintFormat("w4g128a", 4, 128, sym=False),
    "w4g64": GwintFormat("w4g64", 4, 64),  # what finequant-w4 (group_size auto, 4.25 bits) mostly chooses
    "w8pc": GwintFormat("w8pc", 8, None),
    "w8g128": GwintFormat("w8g128", 8, 128),
    "w2g64": GwintFormat("w2g64", 2, 64),
}


# ---------------------------------------------------------------------------------------------------- peers

def _codes_nk(w: dict) -> torch.Tensor:
    return gwint.unpack_codes(w["qweight"], w["bits"], w["in_features"])  # [N, K] uint8


def tinygemm_peer(fmt: GwintFormat, w: dict):
    """torch.ops.aten._weight_int4pack_mm (int4, group-wise, bf16 activations); None where it does not apply."""
    if fmt.bits != 4 or not fmt.sym or fmt.gs(w["in_features"]) not in (32, 64, 128, 256):
        return None
    codes = _codes_nk(w).to(torch.int32)
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # [N, K/2]
    wp = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    sz = torch.stack([w["scales"].to(torch.bfloat16), torch.zeros_like(w["scales"], dtype=torch.bfloat16)], -1)
    gs = fmt.gs(w["in_features"])
    del codes, packed
    return dict(dtype=torch.bfloat16,
                fn=lambda x, wp=wp, sz=sz.contiguous(), gs=gs: torch.ops.aten._weight_int4pack_mm(x, wp, gs, sz))


def gemlite_peer(fmt: GwintFormat, w: dict):
    """gemlite's GemLiteLinearTriton (fp16 activations); None where it does not apply."""
    try:
        from gemlite.core import DType, GemLiteLinearTriton
    except Exception:
        return None
    if not fmt.sym or fmt.bits not in (1, 2, 4, 8):
        return None
    K, N = w["in_features"], w["qweight"].shape[1]
    gs = fmt.gs(K)
    lin = GemLiteLinearTriton(W_nbits=fmt.bits, group_size=gs, in_features=K, out_features=N,
                              input_dtype=DType.FP16, output_dtype=DType.FP16)
    lin.pack(_codes_nk(w), w["scales"].t().contiguous(), 1 << (fmt.bits - 1), bias=None)
    return dict(dtype=torch.float16, fn=lambda x, lin=lin: lin(x))


PEERS = {"tinygemm": tinygemm_peer, "gemlite": gemlite_peer}


# ---------------------------------------------------------------------------------------------------- run

def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.float() - ref).norm() / ref.norm()).item()


def run(shapes: Iterable[tuple[int, int]], ms: Iterable[int], formats: Iterable[str],
        dtype: torch.dtype = torch.float16, peers: Iterable[str] = ("tinygemm", "gemlite"),
        log: Callable[[str], None] = print, seed: int = 0,
        on_format_done: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time bitsmith's gwint kernels, fp16 cuBLAS and the peers on every (N, K) x M x format.

    Returns one row per (kernel, N, K, M, format): us (median per call, CUDA graph, cold L2), GB/s (weights +
    activations + output over time), speedup over cuBLAS fp16 at the same (N, K, M), rel_err (against the fp32
    dequantized reference on fresh random inputs), and the chosen kernel configuration.
    """
    from . import gwint_triton

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(seed)
    ms, formats, peers = list(ms), [FORMATS[f] for f in formats], list(peers)
    rows: list[dict] = []
    bw = copy_bandwidth_gbs()
    log(f"device: {torch.cuda.get_device_name()}, L2 {l2_bytes() / 2**20:.0f} MiB, copy bandwidth {bw:.0f} GB/s")
    rows.append(dict(kernel="d2d-copy", GBs=bw))
    for N, K in shapes:
        # cuBLAS fp16 baseline, rotated weights
        wbytes = N * K * 2
        R = rotations(wbytes)
        ws = [torch.randn(N, K, device=device, dtype=dtype, generator=gen) for _ in range(R)]
        base = {}
        for M in ms:
            xs = [torch.randn(M, K, device=device, dtype=dtype, generator=gen) for _ in range(R)]
            us = graph_time_us([lambda x=x, w=w: F.linear(x, w) for x, w in zip(xs, ws)])
            base[M] = us
            nb = wbytes + 2 * M * (K + N)
            rows.append(dict(kernel="cublas-fp16", N=N, K=K, M=M, format="fp16", us=us, GBs=nb / us / 1e3,
                             speedup=1.0))
            log(f"N={N} K={K} M={M} cublas fp16: {us:.1f} us, {nb / us / 1e3:.0f} GB/s")
        del ws
        torch.cuda.empty_cache()
        for fmt in formats:
            w0 = fmt.make(N, K, dtype, device, gen)
            set_bytes = fmt.nbytes(w0)
            R = rotations(set_bytes)
            wsets = [w0] + [fmt.make(N, K, dtype, device, gen) for _ in range(R - 1)]
            wf = gwint.dequantize(w0["qweight"], w0["scales"], w0["zeros"], w0["bits"], w0["group_size"], K,
                                  dtype=torch.float32)
            peer_fns = {}
            for p in peers:
                try:
                    made = [PEERS[p](fmt, w) for w in wsets]
                    if made[0] is not None:
                        peer_fns[p] = made
                except Exception as e:  # a peer that cannot run here is reported, not fatal
                    log(f"  peer {p} unavailable for {fmt.name}: {type(e).__name__}: {e}")
            for M in ms:
                xs = [torch.randn(M, K, device=device, dtype=dtype, generator=gen) for _ in range(R)]
                xc = torch.randn(M, K, device=device, dtype=dtype, generator=gen)  # fresh input for the check
                ref = xc.float() @ wf.t()
                nb = set_bytes + 2 * M * (K + N)
                err = _rel_err(fmt.call(xc, w0), ref)
                us = graph_time_us([lambda x=x, w=w: fmt.call(x, w) for x, w in zip(xs, wsets)])
                cfg = _chosen_config(gwint_triton, M, N, K, fmt, dtype)
                rows.append(dict(kernel="bitsmith", N=N, K=K, M=M, format=fmt.name, us=us, GBs=nb / us / 1e3,
                                 speedup=base[M] / us, rel_err=err, config=cfg))
                log(f"N={N} K={K} M={M} {fmt.name} bitsmith: {us:.1f} us, {nb / us / 1e3:.0f} GB/s, "
                    f"{base[M] / us:.2f}x cuBLAS, rel_err {err:.1e}, cfg {cfg}")
                for p, made in peer_fns.items():
                    pdt = made[0]["dtype"]
                    try:
                        xps = [x.to(pdt) for x in xs]
                        perr = _rel_err(made[0]["fn"](xc.to(pdt)), xc.to(pdt).float() @ wf.t())
                        pus = graph_time_us([lambda x=x, m=m: m["fn"](x) for x, m in zip(xps, made)])
                    except Exception as e:
                        log(f"  peer {p} failed at M={M}: {type(e).__name__}: {e}")
                        continue
                    rows.append(dict(kernel=p, N=N, K=K, M=M, format=fmt.name, us=pus, GBs=nb / pus / 1e3,
                                     speedup=base[M] / pus, rel_err=perr, act_dtype=str(pdt)[6:]))
                    log(f"N={N} K={K} M={M} {fmt.name} {p}: {pus:.1f} us, {base[M] / pus:.2f}x cuBLAS, "
                        f"rel_err {perr:.1e}")
            del wsets, w0, wf, peer_fns
            torch.cuda.empty_cache()
            if on_format_done is not None:  # e.g. save what is measured so far (a run may be cut by a time limit)
                on_format_done(rows)
    return rows


def _chosen_config(mod, M, N, K, fmt, dtype):
    gs = fmt.gs(K)
    base = (fmt.bits, gs, fmt.sym, False, dtype, N, K)
    if M == 1:
        return mod._TUNED.get(("gemv",) + base)
    if M >= mod.DEQUANT_MIN_M:
        return "dequant+cublas"
    return mod._TUNED.get(("gemm", mod._next_pow2(M)) + base)


def format_table(rows: list[dict], kernels: Iterable[str] = ("bitsmith", "tinygemm", "gemlite")) -> str:
    """Markdown table: one line per (N, K, format, M), cuBLAS time and each kernel's time / speedup / GB/s."""
    kernels = list(kernels)
    base = {(r["N"], r["K"], r["M"]): r for r in rows if r["kernel"] == "cublas-fp16"}
    byk = {(r["kernel"], r["N"], r["K"], r["M"], r["format"]): r for r in rows if "format" in r}
    keys = sorted({(r["N"], r["K"], r["format"], r["M"]) for r in rows if r["kernel"] == "bitsmith"},
                  key=lambda t: (t[2], t[0] * t[1], t[0], t[3]))
    head = "| format | N x K | M | cuBLAS fp16 us | " + " | ".join(f"{k} us (x cuBLAS, GB/s)" for k in kernels) + " |"
    lines = [head, "|" + "---|" * (4 + len(kernels))]
    for N, K, f, M in keys:
        cells = []
        for k in kernels:
            r = byk.get((k, N, K, M, f))
            cells.append("-" if r is None else f"{r['us']:.1f} ({r['speedup']:.2f}x, {r['GBs']:.0f})")
        lines.append(f"| {f} | {N}x{K} | {M} | {base[(N, K, M)]['us']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
