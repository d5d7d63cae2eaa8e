"""Bandwidth ceilings at a given size: what a kernel that only reads `nbytes` (and writes next to nothing) reaches
on this device, next to torch's own reduction and a device-to-device copy of the same bytes.

Why: an M = 1 weight-only kernel moves its packed weights once (planes + scales: 17.8 MB for 2-bit 8192x8192) and
nothing else of note, so its best possible time is a read-only stream of those bytes, launch included. The large
copy of `bench.copy_bandwidth_gbs` (1 GiB) hides what short streams lose to the ramp-up and the tail of one launch.

    us = stream_times_us(nbytes)   # {"read": best Triton read, "read_cfg": ..., "sum": torch sum, "copy": copy}

Each time is per call, taken as the kernels are (`bench.graph_time_us`: rotated buffers that together exceed
the L2 three times, one CUDA graph, median replay), so it compares with the kernel rows of the same run.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = tl = None

# (words per load step, steps per program, warps): 4 warps and 1024 words give each thread two 16-byte loads per
# step, so 8 steps keep 256 bytes per thread in flight before the first xor
READ_CONFIGS = ((1024, 4, 4), (1024, 8, 4), (1024, 16, 4), (2048, 8, 8), (512, 8, 4))


if triton is not None:
    from .gwint_triton import _epilogue

    @triton.jit
    def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STEPS: tl.constexpr, EVEN: tl.constexpr):
        # x: [n] int32; out: [programs] int32, the xor of the program's BLOCK * STEPS words (keeps the loads live).
        # Straight-line steps: every load of the program is issued before the xors consume them.
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * (BLOCK * STEPS)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for i in tl.static_range(STEPS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            if EVEN:
                v = tl.load(x_ptr + offs)
            else:
                v = tl.load(x_ptr + offs, mask=offs < n, other=0)
            acc = acc ^ v
        tl.store(out_ptr + pid, tl.xor_sum(acc, axis=0))


    @triton.jit
    def _read_tiles_kernel(x_ptr, out_ptr, ws_ptr, cnt_ptr, N, split_k, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                           EPI: tl.constexpr):
        # x: [split_k * ROWS, N] int32 (N % BLOCK_N == 0). Program (pid_n, pid_k) reads rows pid_k * ROWS .. + ROWS
        # of columns pid_n * BLOCK_N .. + BLOCK_N (the grid and bytes of the f16x2 GEMV's unrolled splits) and xors
        # them per column. EPI 0: one word per program to out (int32 [programs]); EPI 1: the column values as fp32
        # through the GEMVs' split-K epilogue (`gwint_triton._epilogue`: atomics into ws, the last split of a
        # column block stores out (fp16 [N]) and zeroes ws).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.int32)
        for r in tl.static_range(ROWS):
            acc = acc ^ tl.load(x_ptr + (pid_k * ROWS + r).to(tl.int64) * N + offs_n)
        if EPI == 0:
            tl.store(out_ptr + pid_k * tl.num_programs(0) + pid_n, tl.xor_sum(acc, axis=0))
        else:
            _epilogue(acc.to(tl.float32)[None, :], tl.arange(0, 1), offs_n, 1, N, out_ptr, N, out_ptr, ws_ptr,
                      cnt_ptr, pid_n, split_k, False)


def read_tiles(x: torch.Tensor, rows: int, block_n: int = 1024, epilogue: bool = False, num_warps: int = 4,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x: int32 [R, N] (R % rows == 0, N % block_n == 0), read in programs of rows x block_n. Without `epilogue`:
    int32 [R / rows * N / block_n], one xor per program (pid_k-major); with: fp16 [N], per column the sum over
    row blocks of that block's xor (as fp32), through the split-K epilogue the GEMVs use."""
    from .gwint_triton import _workspace

    R, N = x.shape
    if x.dtype != torch.int32 or R % rows or N % block_n:
        raise ValueError(f"read_tiles takes int32 [R, N] with R % {rows} == 0 and N % {block_n} == 0")
    split = R // rows
    grid = (N // block_n, split)
    if out is None:
        out = (torch.empty(N, dtype=torch.float16, device=x.device) if epilogue
               else torch.empty(grid[0] * grid[1], dtype=torch.int32, device=x.device))
    ws, cnt = _workspace(x.device, N if epilogue and split > 1 else 0, grid[0] if epilogue and split > 1 else 0)
    _read_tiles_kernel[grid](x, out, ws, cnt, N, split, ROWS=rows, BLOCK_N=block_n, EPI=int(epilogue),
                             num_warps=num_warps)
    return out


def read_words(x: torch.Tensor, block: int = 1024, steps: int = 8, num_warps: int = 4,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x: int32 [n] -> int32 [ceil(n / (block * steps))], each the xor of one program's words (any n)."""
    if x.dtype != torch.int32 or x.dim() != 1:
        raise ValueError(f"read_words takes a 1D int32 tensor, got {x.dtype} {tuple(x.shape)}")
    n = x.numel()
    per = block * steps
    programs = max(1, -(-n // per))
    if out is None:
        out = torch.empty(programs, dtype=torch.int32, device=x.device)
    _read_kernel[(programs,)](x, out, n, BLOCK=block, STEPS=steps, EVEN=n % per == 0, num_warps=num_warps)
    return out


def xor_reference(x: torch.Tensor, per: int) -> torch.Tensor:
    """`read_words`'s result in torch: the xor of each run of `per` words (the last one zero-padded)."""
    n = x.numel()
    programs = max(1, -(-n // per))
    w = torch.zeros(programs * per, dtype=torch.int64)
    w[:n] = x.cpu().to(torch.int64) & 0xFFFFFFFF
    bits = (w.view(programs, per, 1) >> torch.arange(32)) & 1  # [P, per, 32]
    parity = bits.sum(1) % 2  # [P, 32]
    v = (parity << torch.arange(32)).sum(1)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def stream_times_us(nbytes: int, configs=READ_CONFIGS, log=None) -> dict:
    """Per-call microseconds (CUDA graph, rotated buffers) of a read-only stream of `nbytes` (best Triton config,
    every config's time under "read_all"), torch's int32 sum of the same bytes, and a copy of them."""
    from .bench import graph_time_us, rotations

    words = max(1, nbytes // 4)
    R = rotations(words * 4)
    bufs = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device="cuda") for _ in range(R)]
    res: dict = {"bytes": words * 4, "sets": R, "read_all": {}}
    for block, steps, warps in configs:
        outs = [torch.empty(-(-words // (block * steps)), dtype=torch.int32, device="cuda") for _ in range(R)]
        got = read_words(bufs[0], block, steps, warps, outs[0])
        head = min(words, 4 * block * steps)  # the first programs' words (a host reference of all is GBs)
        if not torch.equal(got[:-(-head // (block * steps))].cpu(), xor_reference(bufs[0][:head], block * steps)):
            raise RuntimeError(f"read kernel wrong at {block}x{steps}")
        us = graph_time_us([lambda b=b, o=o: read_words(b, block, steps, warps, o) for b, o in zip(bufs, outs)])
        res["read_all"][f"{block}x{steps}w{warps}"] = us
        if "read" not in res or us < res["read"]:
            res["read"], res["read_cfg"] = us, f"{block}x{steps}w{warps}"
    res["sum"] = graph_time_us([lambda b=b: b.sum() for b in bufs])
    dsts = [torch.empty_like(b) for b in bufs]
    res["copy"] = graph_time_us([lambda b=b, d=d: d.copy_(b) for b, d in zip(bufs, dsts)])
    if log:
        log(f"stream {words * 4 / 1e6:.1f} MB: read {res['read']:.1f} us ({res['read_cfg']}, "
            f"{words * 4 / res['read'] / 1e3:.0f} GB/s), torch sum {res['sum']:.1f} us, copy {res['copy']:.1f} us "
            f"({2 * words * 4 / res['copy'] / 1e3:.0f} GB/s read + written)")
    del bufs, dsts
    torch.cuda.empty_cache()
    return res


def tile_times_us(R: int, N: int, rows: int, block_n: int = 1024, num_warps: int = 4, log=None) -> dict:
    """Per-call microseconds (CUDA graph, rotated buffers) of `read_tiles` over int32 [R, N] in programs of rows x
    block_n: "store" (one word per program) and "epilogue" (the GEMVs' split-K epilogue), and `read_words` over the
    same bytes ("stream") for reference."""
    from .bench import graph_time_us, rotations

    nbytes = R * N * 4
    sets = rotations(nbytes)
    bufs = [torch.randint(-2**31, 2**31 - 1, (R, N), dtype=torch.int32, device="cuda") for _ in range(sets)]
    res: dict = {"bytes": nbytes, "R": R, "N": N, "rows": rows, "block_n": block_n,
                 "programs": R // rows * N // block_n}
    outs = [torch.empty(res["programs"], dtype=torch.int32, device="cuda") for _ in range(sets)]
    res["store"] = graph_time_us([lambda b=b, o=o: read_tiles(b, rows, block_n, False, num_warps, o)
                                  for b, o in zip(bufs, outs)])
    outs = [torch.empty(N, dtype=torch.float16, device="cuda") for _ in range(sets)]
    res["epilogue"] = graph_time_us([lambda b=b, o=o: read_tiles(b, rows, block_n, True, num_warps, o)
                                     for b, o in zip(bufs, outs)])
    flat = [b.view(-1) for b in bufs]
    outs = [torch.empty(-(-R * N // 8192), dtype=torch.int32, device="cuda") for _ in range(sets)]
    res["stream"] = graph_time_us([lambda b=b, o=o: read_words(b, 1024, 8, 4, o) for b, o in zip(flat, outs)])
    if log:
        log(f"tiles {R}x{N} ({nbytes / 1e6:.1f} MB, {rows} rows x {block_n}, {res['programs']} programs): "
            f"store {res['store']:.1f} us, split-K epilogue {res['epilogue']:.1f} us, stream {res['stream']:.1f} us")
    del bufs, outs, flat
    torch.cuda.empty_cache()
    return res
