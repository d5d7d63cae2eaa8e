"""bitplane: exact packing, the dequantization rule, and every Triton kernel against the torch reference
(TRITON_INTERPRET=1 on CPU; on a GPU the same tests run the compiled kernels).

Under the interpreter bf16 `tl.dot` operands are upcast (exactly) to fp32 (`DOT_F32`), as in the gwint kernels.
"""

import math
import os
import random

import pytest
import torch

from bitsmith.compress.formats import get_format
from bitsmith.kernels import bitplane as bp
from tests.kernels.conftest import DEVICE, ON_GPU, needs_kernels, rel_error

triton = pytest.importorskip("triton")
from bitsmith.kernels import gwint_triton  # noqa: E402

TOL = {torch.float16: 3e-3, torch.bfloat16: 1.2e-2}  # relative Frobenius error vs the fp32 reference


def _make(N, K, bits, gs, kind, offset, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=g)
    G = bp.num_groups(K, gs)
    if kind == "bipolar":
        coef = (torch.rand(G, N, generator=g) * 0.02 + 0.002).to(dtype)
    else:
        coef = (torch.randn(bits, G, N, generator=g) * 0.02).to(dtype)
    off = (torch.randn(G, N, generator=g) * 0.01).to(dtype) if offset else None
    return codes, bp.pack_planes(codes, bits), coef, off


# ---------------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    for N, K in ((3, 1), (5, 32), (7, 33), (2, 97), (4, 256)):
        codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8)
        planes = bp.pack_planes(codes, bits)
        assert planes.dtype == torch.int32 and planes.shape == (bits, math.ceil(K / 32), N)
        assert torch.equal(bp.unpack_planes(planes, K), codes)
        words = planes.to(torch.int64) & 0xFFFFFFFF
        tail = K - (planes.shape[1] - 1) * 32  # real bits in the last word; the padding above them is zero
        assert int((words[:, -1] >> tail).max()) == 0
        # bit order: bit j of planes[i, w, n] is bit i of the code of W[n, 32 w + j]
        n, k = N - 1, K - 1
        for i in range(bits):
            assert (int(words[i, k // 32, n]) >> (k % 32)) & 1 == (int(codes[n, k]) >> i) & 1


@pytest.mark.parametrize("kind,offset", [("bipolar", False), ("bipolar", True), ("bcq", False), ("bcq", True)])
def test_tensor_specs_and_dequantize_rule(kind, offset):
    N, K, bits, gs = 5, 70, 3, 32
    codes, planes, coef, off = _make(N, K, bits, gs, kind, offset, torch.float16, seed=1)
    specs = bp.tensor_specs(N, K, bits, gs, kind, offset, torch.float16)
    got = {"planes": planes, ("scales" if kind == "bipolar" else "alphas"): coef} | ({"offset": off} if offset else {})
    assert set(specs) == set(got)
    for name, (shape, dt) in specs.items():
        assert tuple(got[name].shape) == shape and got[name].dtype == dt
    w = bp.dequantize(planes, coef, off, kind, gs, K, dtype=torch.float32)
    for n, k in ((0, 0), (4, 69), (2, 33), (3, 64)):
        u, g = int(codes[n, k]), k // gs
        if kind == "bipolar":
            want = coef[g, n].float().item() * sum((2 * ((u >> i) & 1) - 1) * 2 ** i for i in range(bits))
            assert want == coef[g, n].float().item() * (2 * u - (2 ** bits - 1))  # odd levels
        else:
            want = sum(coef[i, g, n].float().item() * (2 * ((u >> i) & 1) - 1) for i in range(bits))
        if offset:
            want += off[g, n].float().item()
        assert w[n, k].item() == pytest.approx(want, rel=1e-6, abs=1e-9)
    params = {"in_features": K, "out_features": N, "bits": bits, "group_size": gs, "kind": kind, "offset": offset}
    fmt = get_format("bitplane")
    assert torch.equal(fmt.dequantize(got, params), bp.dequantize(planes, coef, off, kind, gs, K))
    per_group = (1 if kind == "bipolar" else bits) + (1 if offset else 0)
    assert fmt.bits_per_weight(params, torch.float16) == pytest.approx(
        (bits * 32 * planes.shape[1] * N + 16 * per_group * 3 * N) / (N * K))


def test_packed_linear_module_uses_the_format():
    from bitsmith.kernels.modules import PackedLinear

    N, K, bits, gs = 6, 64, 2, 32
    _, planes, coef, _ = _make(N, K, bits, gs, "bcq", False, torch.float32, seed=4)
    entry = {"format": "bitplane", "format_version": 1, "in_features": K, "out_features": N, "bits": bits,
             "group_size": gs, "kind": "bcq", "offset": False}
    mod = PackedLinear(entry, torch.float32, bias=False)
    mod.planes.copy_(planes)
    mod.alphas.copy_(coef)
    x = torch.randn(3, K)
    w = bp.dequantize(planes, coef, None, "bcq", gs, K)
    assert torch.allclose(mod(x), x @ w.t(), atol=1e-6)


def test_dispatch():
    x = torch.randn(2, 64).to(torch.float16)
    assert not bp.use_triton(x.float(), 32, 64)  # fp32 activations: the reference
    os.environ["BITSMITH_TRITON"] = "1"
    try:
        assert bp.use_triton(x, 32, 64)
        assert not bp.use_triton(x, 48, 96)  # K-tiles would straddle groups: the reference
        assert bp.use_triton(x, 100, 100)  # one group per row: any K
    finally:
        del os.environ["BITSMITH_TRITON"]
    assert bp.use_triton(x.to(DEVICE), 32, 64) == ON_GPU  # by default: the kernels where x is on a GPU


# ---------------------------------------------------------------------------------------------------- kernels

def _launch(regime, x, planes, coef, off, bias, kind, gs, K, cfg):
    M, N = x.shape[0], planes.shape[2]
    if regime == "dequant":
        return bp.triton_linear(x, planes, coef, off, kind, gs, K, bias=bias, regime="dequant")
    out = torch.full((M, N), float("nan"), dtype=x.dtype, device=x.device)  # poison: every element must be written
    launch = bp.launch_gemv if regime == "gemv" else bp.launch_gemm
    launch(x, planes, coef, off, bias, out, kind, gs, K, cfg)
    return out


def _case(bits, kind, regime, seed):
    """A random awkward shape and configuration: odd N, K not a multiple of the tile, partial last groups,
    split-K (sometimes more splits than K tiles), bias and offset on some."""
    rnd = random.Random(seed)
    gs = rnd.choice([32, 64, 128])
    K = rnd.choice([gs + 32, 2 * gs, gs + 8, rnd.randint(33, 200)])  # the interpreter's cost grows with K * N
    N = rnd.randint(5, 40)
    dtype = rnd.choice([torch.float16, torch.bfloat16])
    strategy = rnd.randint(0, 1) if bits <= 5 else 0  # plane-wise at 6+ bits: slow under the interpreter
    split = rnd.choice([1, 2, 3, 64])
    if regime == "gemv":
        M, cfg = 1, dict(block_n=32, block_kw=rnd.choice([2, 4]), split_k=split, strategy=strategy)
    elif regime == "gemm":
        M = rnd.randint(2, 20)
        cfg = dict(block_m=16, block_n=rnd.choice([16, 32]), block_kw=rnd.choice([1, 2]), split_k=split,
                   strategy=strategy, group_m=rnd.choice([1, 8]))
    else:
        M, cfg = rnd.randint(1, 9), None
    return M, N, K, gs, dtype, cfg, rnd.random() < 0.5, rnd.random() < 0.4


@needs_kernels
@pytest.mark.parametrize("kind", ["bipolar", "bcq"])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("regime", ["gemv", "gemm", "dequant"])
def test_kernel_matches_reference(regime, bits, kind):
    seed = bits * 100 + len(regime) * 10 + (kind == "bcq")
    M, N, K, gs, dtype, cfg, with_bias, with_offset = _case(bits, kind, regime, seed)
    _, planes, coef, off = _make(N, K, bits, gs, kind, with_offset, dtype, seed)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if with_bias else None
    ref = bp.linear_reference(x.float(), planes, coef.float(), None if off is None else off.float(), kind, gs, K,
                              None if bias is None else bias.float())
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    args = [dev(t) for t in (x, planes, coef, off, bias)]
    out = _launch(regime, *args, kind, gs, K, cfg)
    assert out.dtype == dtype and out.shape == (M, N)
    err = rel_error(out.cpu(), ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (M={M} N={N} K={K} g={gs} {dtype} {cfg})"
    if cfg is not None and cfg["split_k"] > 1:  # split-K leaves the shared workspace zeroed for the next call
        for ws, cnt in gwint_triton._WORKSPACES.values():
            assert not ws.any() and not cnt.any()


@needs_kernels
def test_default_path_and_batch_dims():
    """`linear` with BITSMITH_TRITON=1 takes the kernels with their default (untuned) configurations."""
    torch.manual_seed(5)
    os.environ["BITSMITH_TRITON"] = "1"
    try:
        for M, kind, dtype in ((1, "bipolar", torch.float16), (6, "bcq", torch.bfloat16)):
            N, K, bits, gs = 40, 160, 3, 32
            _, planes, coef, off = _make(N, K, bits, gs, kind, kind == "bcq", dtype, seed=M)
            x = torch.randn(2, M, K).to(dtype)
            ref = bp.linear_reference(x.float(), planes, coef.float(), None if off is None else off.float(), kind,
                                      gs, K)
            dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
            out = bp.linear(dev(x), dev(planes), dev(coef), dev(off), kind, gs, K)
            assert out.shape == (2, M, N)
            assert rel_error(out.cpu(), ref) < TOL[dtype]
    finally:
        del os.environ["BITSMITH_TRITON"]


# ---------------------------------------------------------------------------------------------------- swapped kernel

@needs_kernels
@pytest.mark.parametrize("kind", ["bipolar", "bcq"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_swapped_kernel_matches_reference(bits, kind):
    """`_gemm_t_kernel` (weights as the mma's A operand) at M = 1, 2, 16, 33: odd N, K not a multiple of 32 and a
    partial last group, split-K, every (join, xperm) variant, fp16 through the fp16 A arithmetic (the twin of the
    GPU's PTX) and bf16 through the fp32 rebuild; bias / offset on some."""
    rnd = random.Random(1000 + bits * 10 + (kind == "bcq"))
    gs = rnd.choice([32, 64, 128])
    K = gs + 32 + rnd.choice([0, 8])  # two groups, the last partial; sometimes a partial last word
    N = rnd.choice([17, 23, 33])
    with_offset, with_bias = bits % 2 == 1, bits % 3 == 0
    for idx, M in enumerate((1, 2, 16, 33)):
        dtype = torch.bfloat16 if (bits + idx) % 4 == 0 else torch.float16
        _, planes, coef, off = _make(N, K, bits, gs, kind, with_offset, dtype, seed=bits * 7 + idx)
        x = torch.randn(M, K).to(dtype)
        bias = torch.randn(N).to(dtype) if with_bias else None
        ref = bp.linear_reference(x.float(), planes, coef.float(), None if off is None else off.float(), kind, gs, K,
                                  None if bias is None else bias.float())
        block_kw = rnd.choice([1, 2])  # small tiles for the interpreter; tl.dot needs K >= 16 when compiled
        cfg = dict(kernel="swapped", block_m=16 if M <= 16 else 32, block_n=16, block_kw=16 if ON_GPU else block_kw,
                   split_k=rnd.choice([1, 2, 5]), join=idx % 2, xperm=idx // 2, group_m=rnd.choice([1, 8]))
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        bp.launch_gemm_t(dev(x), dev(planes), dev(coef), dev(off), dev(bias), out, kind, gs, K, cfg)
        err = rel_error(out.cpu(), ref)
        assert err < TOL[dtype], f"relative error {err:.2e} (M={M} N={N} K={K} g={gs} {dtype} {cfg})"
    for ws, cnt in gwint_triton._WORKSPACES.values():
        assert not ws.any() and not cnt.any()


def _run_ptx(asm: str, inputs: list[int], outputs: int = 2) -> tuple[float, float]:
    """A tiny emulator of the PTX that `_bipolar_pair_asm` / `_bcq_pair_asm` emit (lop3, shl, mov, f16x2 add / sub
    / mul / fma with round-to-nearest): inputs follow the `outputs` registers ($2, $3, ... by default), as
    uint32; returns the two fp16 halves of the result."""
    import numpy as np

    def halves(v):
        return np.array([v & 0xFFFF, v >> 16], dtype=np.uint16).view(np.float16).astype(np.float64)

    regs, ins = {}, [0] * outputs + inputs
    val = lambda t: ins[int(t[1:])] if t.startswith("$") else regs[t] if t in regs else int(t, 0)  # noqa: E731
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if rest.startswith("{"):  # mov.b32 {$0, $1}, t
            return tuple(float(h) for h in halves(regs[rest.rsplit(",", 1)[1].strip()]).astype(np.float16))
        d, *a = [t.strip() for t in rest.split(",")]
        a = [val(t) for t in a]
        if op == "lop3.b32":
            regs[d] = sum((((a[3] >> ((((a[0] >> b) & 1) << 2) | (((a[1] >> b) & 1) << 1) | ((a[2] >> b) & 1))) & 1)
                           << b) for b in range(32))
        elif op == "shl.b32":
            regs[d] = (a[0] << a[1]) & 0xFFFFFFFF
        elif op == "mov.b32":
            regs[d] = a[0]
        else:  # exact in float64, one rounding to fp16
            x, y = halves(a[0]), halves(a[1])
            r = {"sub.rn.f16x2": lambda: x - y, "mul.rn.f16x2": lambda: x * y, "add.rn.f16x2": lambda: x + y,
                 "fma.rn.f16x2": lambda: x * y + halves(a[2])}[op]().astype(np.float16)
            regs[d] = int(r.view(np.uint16)[0]) | (int(r.view(np.uint16)[1]) << 16)
            if d == "$0":  # the f16x2 GEMV writes its result register directly
                return tuple(float(h) for h in r)
    raise AssertionError("no output")


@pytest.mark.parametrize("bits", range(1, 9))
def test_ptx_pairs_compute_the_fp16_rule(bits):
    """The PTX strings (run on the GPU only) against the fp16 arithmetic their plain-Triton twin uses under the
    interpreter: bipolar ((u - L/2) rounded-times 2s) [+ offset], BCQ ordered fp16 sum of +-alpha_i [+ offset]."""
    import numpy as np

    rnd = random.Random(bits)
    L, WIN = (1 << bits) - 1, 10 - bits
    f16 = lambda v: np.float16(v)  # noqa: E731
    pair = lambda h: int(np.array([h, h], dtype=np.float16).view(np.uint32)[0])  # noqa: E731
    for trial in range(4):
        w = [rnd.getrandbits(32) for _ in range(8)]
        s2, off = f16(2 * rnd.uniform(1e-3, 0.05)), f16(rnd.uniform(-0.05, 0.05))
        alphas = [f16(rnd.uniform(-0.05, 0.05)) for _ in range(8)]
        for jj in range(16):
            has_off = (jj + trial) % 2 == 1
            R = (jj // WIN) * WIN - 1  # the kernel's pre-shift: bit jj of plane i -> bit 1 + jj % WIN + i
            c = [((wi >> (R - i)) if R >= i else (wi << (i - R))) & 0xFFFFFFFF for i, wi in enumerate(w)]
            got = _run_ptx(bp._bipolar_pair_asm(bits, 1 + jj % WIN, has_off), c + [pair(s2), pair(off)])
            got_bcq = _run_ptx(bp._bcq_pair_asm(bits, jj, has_off), w + [pair(a) for a in alphas] + [pair(off)])
            for h, j in ((0, jj), (1, jj + 16)):
                u = sum(((w[i] >> j) & 1) << i for i in range(bits))
                want = f16((u - L / 2) * float(s2))
                acc = None
                for i in range(bits):
                    d = alphas[i] if (w[i] >> j) & 1 else -alphas[i]
                    acc = d if acc is None else f16(float(acc) + float(d))
                if has_off:
                    want, acc = f16(float(want) + float(off)), f16(float(acc) + float(off))
                assert got[h] == float(want), (bits, jj, h)
                assert got_bcq[h] == float(acc), (bits, jj, h)


@needs_kernels
@pytest.mark.parametrize("kind", ["bipolar", "bcq"])
@pytest.mark.parametrize("bits", range(1, bp.H2_MAX_BITS + 1))
def test_gemv_h2_matches_reference(bits, kind):
    """The f16x2 GEMV (plain-Triton twin of its PTX under the interpreter), bits 1..8: odd N, partial words and
    groups, split-K or unrolled splits, f16x2 chunks or fp32 products (chunk 0), bias, offset on some."""
    rnd = random.Random(2000 + bits + 100 * (kind == "bcq"))
    for gs, K, N in ((32, 160, 37), (64, 200, 23), (128, 128 + 40, 9)):
        with_offset = rnd.random() < 0.5
        _, planes, coef, off = _make(N, K, bits, gs, kind, with_offset, torch.float16, seed=gs + bits)
        x, bias = torch.randn(1, K).half(), torch.randn(N).half()
        ref = bp.linear_reference(x.float(), planes, coef.float(), None if off is None else off.float(), kind,
                                  gs, K, bias.float())
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        out = torch.full((1, N), float("nan"), dtype=torch.float16, device=DEVICE)
        cfg = dict(kernel="h2", block_n=16, block_kw=rnd.choice([1, 2]), split_k=rnd.choice([1, 3]),
                   chunk=rnd.choice([bp.h2_chunk(1 if kind == "bcq" else bits), 0]))
        if rnd.random() < 0.6:  # straight-line splits of `unroll` tiles (the last one partly past K)
            cfg["unroll"] = rnd.choice([2, 3])
        bp.launch_gemv_h2(dev(x), dev(planes), dev(coef), dev(off), dev(bias), out, kind, gs, K, cfg)
        err = rel_error(out.cpu(), ref)
        assert err < TOL[torch.float16], f"relative error {err:.2e} (N={N} K={K} g={gs} {cfg})"


@pytest.mark.parametrize("bits", range(1, 9))
def test_gemv_pair_ptx_is_one_hfma2(bits):
    """`_gemv_pair_asm`: the bipolar pair bits, the exact HSUB2, then h + (u - L/2) x rounded once per lane."""
    import numpy as np

    rnd = random.Random(50 + bits)
    L, WIN = (1 << bits) - 1, 10 - bits
    pair2 = lambda a, b: int(np.array([a, b], dtype=np.float16).view(np.uint32)[0])  # noqa: E731
    for trial in range(3):
        w = [rnd.getrandbits(32) for _ in range(8)]
        for jj in range(16):
            xs = [np.float16(rnd.gauss(0, 2)) for _ in range(2)]
            hs = [np.float16(rnd.gauss(0, 20)) for _ in range(2)]
            R = (jj // WIN) * WIN - 1
            c = [((wi >> (R - i)) if R >= i else (wi << (i - R))) & 0xFFFFFFFF for i, wi in enumerate(w)]
            got = _run_ptx(bp._gemv_pair_asm(bits, 1 + jj % WIN), c + [pair2(*xs), pair2(*hs)], outputs=1)
            for h, j in ((0, jj), (1, jj + 16)):
                u = sum(((w[i] >> j) & 1) << i for i in range(bits))
                want = np.float16((u - L / 2) * float(xs[h]) + float(hs[h]))
                assert got[h] == float(want), (bits, jj, h)


@pytest.mark.parametrize("bits", range(1, 9))
def test_gemv_pair_f32_ptx_gives_exact_offsets(bits):
    """`_gemv_pair_f32_asm` (chunk 0): the LOP3 bits and the exact HSUB2 give u - L/2 for both slots (the emulator
    reads the halves at `mov.b32 {l, h}`; the two cvt.f32.f16 after it are exact, checked on the GPU)."""
    rnd = random.Random(70 + bits)
    L, WIN = (1 << bits) - 1, 10 - bits
    for trial in range(3):
        w = [rnd.getrandbits(32) for _ in range(8)]
        for jj in range(16):
            R = (jj // WIN) * WIN - 1
            c = [((wi >> (R - i)) if R >= i else (wi << (i - R))) & 0xFFFFFFFF for i, wi in enumerate(w)]
            asm = bp._gemv_pair_f32_asm(bits, 1 + jj % WIN)
            assert asm.count("lop3.b32") == bits and "cvt.f32.f16 $0, l" in asm and "cvt.f32.f16 $1, h" in asm
            got = _run_ptx(asm, c)
            for h, j in ((0, jj), (1, jj + 16)):
                u = sum(((w[i] >> j) & 1) << i for i in range(bits))
                assert got[h] == u - L / 2, (bits, jj, h)


def test_swapped_configs_offer_the_plain_triton_arithmetic_for_bipolar_fp16_only():
    """Mode 1 (bit-identical to the PTX) is a GPU candidate for bipolar fp16; never for bf16 or BCQ."""
    for M in (1, 16, 33, 128):
        fp16 = bp.gemm_t_configs(M, 8192, 8192, 3, "bipolar", 132, torch.float16)
        assert any(c.get("mode") == 1 for c in fp16) and "mode" not in fp16[0]
        for kind, dt in (("bipolar", torch.bfloat16), ("bipolar", None), ("bcq", torch.float16)):
            assert not any("mode" in c for c in bp.gemm_t_configs(M, 8192, 8192, 3, kind, 132, dt))


@needs_kernels
@pytest.mark.parametrize("kind", ["bipolar", "bcq"])
@pytest.mark.parametrize("bits", range(1, bp.H2_MAX_BITS + 1))
def test_gemv_deep_matches_reference(bits, kind):
    """The deep f16x2 GEMV (`launch_gemv_deep`; plain-Triton twin under the interpreter), bits 1..8, M = 1: odd N,
    K not a multiple of the group size (partial last group and word), K odd (x read as fp16, not as int32 pairs),
    tiles spanning groups (per-row scales), the whole K per program or split-K, 1 or 2 tiles loaded ahead, two
    tiles per loop iteration or one, merged plane words (bipolar 2..4 bits) or not, wide chunks with 2^-xs weights
    or not, bias, offset on some."""
    rnd = random.Random(3000 + bits + 100 * (kind == "bcq"))
    for gs, K, N, rows in ((64, 200, 37, 4), (32, 161, 23, 8), (128, 128 + 40, 9, 2)):
        with_offset = rnd.random() < 0.5
        _, planes, coef, off = _make(N, K, bits, gs, kind, with_offset, torch.float16, seed=gs + 7 * bits)
        x, bias = torch.randn(1, K).half(), torch.randn(N).half()
        ref = bp.linear_reference(x.float(), planes, coef.float(), None if off is None else off.float(), kind,
                                  gs, K, bias.float())
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        out = torch.full((1, N), float("nan"), dtype=torch.float16, device=DEVICE)  # poison
        cfg = dict(kernel="deep", block_n=16, rows=rows, num_warps=4, depth=rnd.choice([1, 2]),
                   split_k=rnd.choice([1, 1, 2, 3]), merge=rnd.choice([0, 1]), pair=rnd.choice([0, 1]),
                   chunk=bp.h2_chunk(1 if kind == "bcq" else bits))
        if bits in bp.H2_WIDE and rnd.random() < 0.5:  # wide chunks: 2^-xs weights (ignored for BCQ)
            cfg["chunk"], cfg["xs"] = bp.H2_WIDE[bits]
        bp.launch_gemv_deep(dev(x), dev(planes), dev(coef), dev(off), dev(bias), out, kind, gs, K, cfg)
        err = rel_error(out.cpu(), ref)
        assert err < TOL[torch.float16], f"relative error {err:.2e} (N={N} K={K} g={gs} {cfg})"
        for ws, cnt in gwint_triton._WORKSPACES.values():  # split-K leaves the workspace zeroed
            assert not ws.any() and not cnt.any()


@needs_kernels
def test_gemv_deep_is_a_tuning_candidate_and_runs_by_config():
    """The deep GEMV's configurations are among the M = 1 candidates (fp16 only), and a pinned config runs it
    through the public op."""
    cands = bp.gemv_candidates(8192, 8192, 2, 128, "bipolar", torch.float16, 132)
    deep = [c for c in cands if c.get("kernel") == "deep"]
    assert deep and all(c["split_k"] == 1 for c in deep if c["block_n"] <= 32)  # 256+ column blocks: whole K
    assert all(c.get("merge") for c in deep)  # merged plane words at 2..4 bits (unmerged lost on the H100)
    assert not any(c.get("merge") for c in bp.gemv_deep_configs(8192, 8192, 5, 128, "bipolar", torch.float16, 132))
    assert not bp.gemv_deep_configs(8192, 8192, 2, 128, "bipolar", torch.bfloat16, 132)
    assert not any(c.get("merge") for c in bp.gemv_deep_configs(8192, 8192, 3, 128, "bcq", torch.float16, 132))
    N, K, gs = 21, 96, 32
    _, planes, coef, _ = _make(N, K, 3, gs, "bipolar", False, torch.float16, seed=5)
    x = torch.randn(1, K).half()
    ref = bp.linear_reference(x.float(), planes, coef.float(), None, "bipolar", gs, K)
    out = bp.triton_linear(x.to(DEVICE), planes.to(DEVICE), coef.to(DEVICE), None, "bipolar", gs, K,
                           config=dict(deep[0], block_n=16, rows=2), regime="gemv")
    assert rel_error(out.cpu(), ref) < TOL[torch.float16]


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_merged_words_and_pair_ptx(bits):
    """Merged plane words: per window the shifted planes are bit-selected into BITS class words (`_h2_class_mask`,
    LOP3 0xE4 = a where k else b), after which `_gemv_merged_pair_asm` (one LOP3, the exact HSUB2, one HFMA2) gives
    h + (u - L/2) x for both slots of every pair, as the unmerged `_gemv_pair_asm` does."""
    import numpy as np

    rnd = random.Random(90 + bits)
    L, WIN = (1 << bits) - 1, 10 - bits
    pair2 = lambda a, b: int(np.array([a, b], dtype=np.float16).view(np.uint32)[0])  # noqa: E731

    def lop3(a, b, c, lut):  # bit i of the result: bit (a_i b_i c_i) of the LUT
        return sum(((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1))) & 1) << i
                   for i in range(32))

    asm = bp._h2_bsel_asm(0x12345678)
    assert asm.endswith("0x12345678, 0xE4;")
    for trial in range(3):
        w = [rnd.getrandbits(32) for _ in range(bits)]
        for jj in range(16):
            start = (jj // WIN) * WIN
            R = start - 1
            c = [((wi >> (R - i)) if R >= i else (wi << (i - R))) & 0xFFFFFFFF for i, wi in enumerate(w)]
            cls = (jj - start) % bits
            m = c[0]
            for i in range(1, bits):  # `_h2_merged`: plane i where the class mask of (cls + 1 + i) % bits is set
                k = bp._h2_class_mask(bits, (cls + 1 + i) % bits) & 0xFFFFFFFF
                sel = lop3(c[i], m, k, 0xE4)
                assert sel == (c[i] & k) | (m & ~k & 0xFFFFFFFF)  # the LUT is "a where k, else b"
                m = sel
            xs = [np.float16(rnd.gauss(0, 2)) for _ in range(2)]
            hs = [np.float16(rnd.gauss(0, 20)) for _ in range(2)]
            for s in (0, bp.H2_WIDE[bits][1]):  # s > 0: the deep GEMV's wide chunks, weights (u - L/2) 2^-s
                got = _run_ptx(bp._gemv_merged_pair_asm(bits, 1 + jj % WIN, s), [m, pair2(*xs), pair2(*hs)], outputs=1)
                unmerged = _run_ptx(bp._gemv_pair_asm(bits, 1 + jj % WIN, s), c + [0] * (8 - bits)
                                    + [pair2(*xs), pair2(*hs)], outputs=1)
                for h, j in ((0, jj), (1, jj + 16)):
                    u = sum(((w[i] >> j) & 1) << i for i in range(bits))
                    want = np.float16((u - L / 2) / 2**s * float(xs[h]) + float(hs[h]))
                    assert got[h] == float(want) and unmerged[h] == float(want), (bits, jj, h, s)
    assert bp._gemv_pair_asm(3, 2) == bp._gemv_pair_asm(3, 2, 0)  # s = 0: the split-K GEMV's PTX as before
