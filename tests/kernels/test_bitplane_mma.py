"""bitplane_mma: the tensor-core M = 1 GEMV. Under TRITON_INTERPRET=1 its plain-Triton twin (the same per-lane
loads, window shifts, merged plane words and A bits; the mma's sum over a lane quad done explicitly) against the
torch reference; the PTX strings of the A registers against the same bit rule (the mma itself runs on the GPU
only: `benchmarks/bitplane_kernels.py` checks it)."""

import random

import pytest
import torch

from bitsmith.kernels import bitplane as bp
from tests.kernels.conftest import DEVICE, needs_kernels, rel_error

triton = pytest.importorskip("triton")
from bitsmith.kernels import bitplane_mma as bm  # noqa: E402
from bitsmith.kernels import gwint_triton  # noqa: E402
from tests.kernels.test_bitplane import _make, _run_ptx  # noqa: E402


@needs_kernels
@pytest.mark.parametrize("bits", range(1, 9))
def test_gemv_mma_matches_reference(bits):
    """Bits 1..8, merged words (2..4 bits) or not: N not a multiple of the 64-row warp tile (clamped row runs,
    N = 4 included), a partial last K tile and word, one group per row, several splits (the last one past K),
    1 or 2 warps, bias on some; split-K workspaces left zeroed."""
    rnd = random.Random(3000 + bits)
    for gs, K, N, warps, unroll in ((128, 300, 100, 1, 2), (256, 512, 4, 1, 1), (384, 384, 132, 2, 3)):
        _, planes, scales, _ = _make(N, K, bits, gs, "bipolar", False, torch.float16, seed=gs + bits)
        x = torch.randn(1, K).half()
        bias = torch.randn(N).half() if rnd.random() < 0.5 else None
        ref = bp.linear_reference(x.float(), planes, scales.float(), None, "bipolar", gs, K,
                                  None if bias is None else bias.float())
        out = torch.full((1, N), float("nan"), dtype=torch.float16, device=DEVICE)
        cfg = dict(num_warps=warps, unroll=unroll, merge=rnd.random() < 0.7)
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        bm.launch_gemv_mma(dev(x), dev(planes), dev(scales), dev(bias), out, gs, K, cfg)
        err = rel_error(out.cpu(), ref)
        assert err < 3e-3, f"relative error {err:.2e} (N={N} K={K} g={gs} {cfg})"
    for ws, cnt in gwint_triton._WORKSPACES.values():
        assert not ws.any() and not cnt.any()


def test_mma_limits_and_candidates():
    """The kernel is offered for bipolar fp16 without offset, N % 4 == 0 and 128-column groups only."""
    assert bm.mma_ok(8192, 8192, 128, "bipolar", None, torch.float16)
    assert bm.mma_ok(1000, 576, 576, "bipolar", None, torch.float16)
    assert not bm.mma_ok(4099, 8192, 128, "bipolar", None, torch.float16)
    assert not bm.mma_ok(8192, 8192, 64, "bipolar", None, torch.float16)
    assert not bm.mma_ok(8192, 8192, 128, "bcq", None, torch.float16)
    assert not bm.mma_ok(8192, 8192, 128, "bipolar", None, torch.bfloat16)
    cands = bp.gemv_candidates(8192, 8192, 2, 128, "bipolar", torch.float16, 132)
    assert any(c.get("kernel") == "mma" for c in cands)
    # the L2-prefetch variants ran slower on the H100 at every M = 1 row: pinned configs only, never tuned
    assert not any(c.get("prefetch") for c in cands)
    assert not any(c.get("kernel") == "mma"
                   for c in bp.gemv_candidates(8192, 8192, 2, 128, "bipolar", torch.float16, 132, offset=True))


def _shifted(w, bits, start):
    R = start - 1  # the window pre-shift: bit j of plane i -> j - start + 1 + i
    return [((wi >> (R - i)) if R >= i else (wi << (i - R))) & 0xFFFFFFFF for i, wi in enumerate(w[:bits])]


@pytest.mark.parametrize("bits", range(1, 9))
def test_a_register_ptx(bits):
    """`_a_asm` (bits LOP3) and, for 2..4 bits, the merged path (`_class_mask` bit selects, then one LOP3) give
    the f16x2 (2^(10-q) + u_jj, 2^(10-q) + u_(jj+16)) exactly, for every slot pair and window."""
    rnd = random.Random(90 + bits)
    WIN = 10 - bits
    for trial in range(3):
        w = [rnd.getrandbits(32) for _ in range(bits)]
        for jj in range(16):
            start = (jj // WIN) * WIN
            q = jj - start + 1
            c = _shifted(w, bits, start)
            asm = bm._a_asm(bits, q).replace("mov.b32 $0, t;", "mov.b32 {$0, $1}, t;")
            got = _run_ptx(asm, c, outputs=1)
            if 2 <= bits <= 4:  # merged word of this pair's class, by the same bit selects as `_merged`
                cls = (jj - start) % bits
                m = c[0]
                for i in range(1, bits):
                    k = bm._class_mask(bits, (cls + 1 + i) % bits) & 0xFFFFFFFF
                    m = (c[i] & k) | (m & ~k & 0xFFFFFFFF)
                mask = (((1 << bits) - 1) << q) * 0x10001
                merged = _run_ptx(f"lop3.b32 t, $1, {mask:#x}, {((25 - q) << 10) * 0x10001:#x}, 0xEA;\n"
                                  "mov.b32 {$0, $1}, t;", [m], outputs=1)
                assert merged == got, (bits, jj)
            for h, j in ((0, jj), (1, jj + 16)):
                u = sum(((w[i] >> j) & 1) << i for i in range(bits))
                assert got[h] == 2.0 ** (10 - q) + u, (bits, jj, h)


def test_bit_select_ptx():
    """`_bsel_asm` (LOP3 0xE4) takes the first operand where the mask is set, the second elsewhere."""
    rnd = random.Random(5)
    for _ in range(20):
        a, b, k = (rnd.getrandbits(32) for _ in range(3))
        lut = 0xE4
        got = sum((((lut >> ((((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((k >> i) & 1))) & 1) << i)
                  for i in range(32))
        assert got == (a & k) | (b & ~k & 0xFFFFFFFF)
        assert "0xe4" in bm._bsel_asm(k - (1 << 32) if k >= 1 << 31 else k).lower()


@needs_kernels
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_gemm_mma_matches_reference(bits):
    """`bitplane_mma_gemm` (x rows as mma columns, warps splitting K inside a program) at M = 1, 3 and 16: clamped
    row runs, partial last K tile, several splits with tiles past K, bias on some; workspaces left zeroed."""
    from bitsmith.kernels import bitplane_mma_gemm as bg

    rnd = random.Random(4000 + bits)
    for M, (gs, K, N, warps, unroll) in zip((1, 3, 16), ((128, 300, 100, 2, 1), (256, 768, 68, 2, 2),
                                                          (128, 384, 36, 1, 2))):
        _, planes, scales, _ = _make(N, K, bits, gs, "bipolar", False, torch.float16, seed=gs + bits + M)
        x = torch.randn(M, K).half()
        bias = torch.randn(N).half() if rnd.random() < 0.5 else None
        ref = bp.linear_reference(x.float(), planes, scales.float(), None, "bipolar", gs, K,
                                  None if bias is None else bias.float())
        out = torch.full((M, N), float("nan"), dtype=torch.float16, device=DEVICE)
        cfg = dict(num_warps=warps, unroll=unroll, merge=rnd.random() < 0.7)
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        bg.launch_gemm_mma(dev(x), dev(planes), dev(scales), dev(bias), out, gs, K, cfg)
        err = rel_error(out.cpu(), ref)
        assert err < 3e-3, f"relative error {err:.2e} (M={M} N={N} K={K} g={gs} {cfg})"
    for ws, cnt in gwint_triton._WORKSPACES.values():
        assert not ws.any() and not cnt.any()
