"""fused_ops: the deep GEMV with RMSNorm prologue / SiLU-multiply epilogue / residual, against the unfused torch
ops in float32 (TRITON_INTERPRET=1 on the CPU, or the compiled kernels on a GPU)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bitsmith.kernels import fused_ops, gwint  # noqa: E402
from tests.kernels.conftest import DEVICE, needs_kernels, rel_error  # noqa: E402

triton = pytest.importorskip("triton")
from bitsmith.kernels import gwint_triton as gt  # noqa: E402

pytestmark = needs_kernels
TOL = 3e-3  # relative Frobenius error, fp16 (the deep GEMV's fp16x2 partial sums; see test_gwint.py)


def _make(N, K, bits, gs, sym, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=g)
    G = gwint.num_groups(K, gs)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.002).to(dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (G, N), dtype=torch.uint8, generator=g)
    return gwint.pack_codes(codes, bits), scales, zeros, g


def _reference(x, w, norm, residual, use_glu):
    """Unfused ops: the norm as Llama rounds it (fp16 out), then everything in float32 (the GEMV's output rounded
    to x's dtype before the SiLU-multiply, as the unfused model stores it)."""
    if norm is not None:
        x = fused_ops.rms_norm(x, *norm)
    y = x.float() @ w.float().t()
    if use_glu:
        y = fused_ops.glu(y.to(x.dtype).float())
    if residual is not None:
        y = residual.float() + y
    return y


def _cfg(**kw):
    return dict(kernel="deep", block_n=32, rows=16, unroll=1, num_warps=4) | kw


# (N, K, bits, group size, symmetric, norm, glu, residual, config): odd N with a partial last group (K = 576, g128),
# g64 / g32 / g16 (scales per row pair), 8-bit per channel, asymmetric zeros; every config keeps K in one split.
CASES = [
    (67, 576, 4, 128, True, True, False, False, _cfg(rows=8, unroll=9)),
    (67, 576, 4, 128, False, True, False, True, _cfg(rows=8, unroll=9, block_n=16)),
    (80, 320, 4, 64, True, True, True, False, _cfg(rows=8, unroll=5, block_n=16)),
    (96, 512, 4, 128, True, True, True, False, _cfg(rows=64)),  # EVEN (unmasked) tiles
    (66, 256, 8, 256, False, False, True, False, _cfg(rows=16, unroll=4, block_n=64)),
    (35, 96, 4, 16, False, False, False, True, _cfg(rows=4, unroll=3, block_n=16)),
    (34, 320, 4, 32, True, True, True, False, _cfg(rows=8, unroll=5, block_n=2)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}K{}b{}g{}{}{}{}{}".format(
    *c[:4], "s" if c[4] else "a", "-norm" if c[5] else "", "-glu" if c[6] else "", "-res" if c[7] else ""))
def test_fused_gemv_matches_unfused_ops(case):
    N, K, bits, gs, sym, use_norm, use_glu, use_res, cfg = case
    qw, scales, zeros, g = _make(N, K, bits, gs, sym, torch.float16, seed=N + K + bits)
    w = gwint.dequantize(qw, scales, zeros, bits, gs, K, torch.float32)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    for rep in range(2):  # fresh inputs each call
        x = (torch.randn(1, 1, K, generator=g) * 3).half()  # a residual stream: rms ~3, not 1
        nw = (torch.rand(K, generator=g) + 0.5).half() if use_norm else None
        res = torch.randn(1, 1, N, generator=g).half() if use_res else None
        norm = (nw, 1e-5) if use_norm else None
        ref = _reference(x, w, norm, res, use_glu)
        out = gt.fused_gemv(dev(x), dev(qw), dev(scales), dev(zeros), bits, gs, K, dev(nw), 1e-5, dev(res), use_glu,
                            config=cfg)
        assert out is not None and out.shape == (1, 1, N // 2 if use_glu else N) and out.dtype == torch.float16
        err = rel_error(out.cpu(), ref)
        assert err < TOL, f"relative error {err:.2e} (call {rep})"


def test_fused_linear_module_paths():
    """fused_linear on a gwint PackedLinear: the fused kernel for one fp16 row; the unfused ops for two rows and for
    bf16 (the deep kernel takes neither), all against the same float32 reference; nn.Linear composes."""
    from bitsmith.kernels.modules import PackedLinear

    N, K, bits, gs = 48, 256, 4, 64
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float16, torch.bfloat16):
        qw, scales, _, _ = _make(N, K, bits, gs, True, dtype, seed=11)
        entry = {"format": "gwint", "format_version": 1, "in_features": K, "out_features": N, "bits": bits,
                 "group_size": gs, "symmetric": True}
        lin = PackedLinear(entry, dtype, device=DEVICE)
        lin.qweight.copy_(qw)
        lin.scales.copy_(scales)
        w = lin.dequantized_weight().float().cpu()
        for M in (1, 2):
            x = (torch.randn(1, M, K, generator=g) * 2).to(dtype)
            nw = (torch.rand(K, generator=g) + 0.5).to(dtype)
            ref = _reference(x, w, (nw, 1e-6), None, True)
            os.environ["BITSMITH_TRITON"] = "1"  # the Triton path on the CPU too (under the interpreter)
            try:
                out = fused_ops.fused_linear(x.to(DEVICE), lin, norm=(nw.to(DEVICE), 1e-6), glu=True)
            finally:
                del os.environ["BITSMITH_TRITON"]
            assert out.shape == (1, M, N // 2)
            assert rel_error(out.float().cpu(), ref) < (3e-3 if dtype == torch.float16 else 1e-2), (dtype, M)
    dense = torch.nn.Linear(K, N, bias=False)
    x, r = torch.randn(2, K), torch.randn(2, N)
    torch.testing.assert_close(fused_ops.fused_linear(x, dense, residual=r), r + dense(x))


def test_fused_gemv_declines_and_rejects():
    N, K = 64, 256
    qw, scales, _, _ = _make(N, K, 4, 128, True, torch.float16, seed=3)
    qw, scales = qw.to(DEVICE), scales.to(DEVICE)
    x = torch.randn(1, K).half().to(DEVICE)
    # not for it: two rows, bf16, glu with a residual -> None (the caller composes)
    assert gt.fused_gemv(torch.randn(2, K).half().to(DEVICE), qw, scales, None, 4, 128, K, glu=True) is None
    assert gt.fused_gemv(x.bfloat16(), qw, scales.bfloat16(), None, 4, 128, K, glu=True) is None
    assert gt.fused_gemv(x, qw, scales, None, 4, 128, K, residual=torch.zeros(N).half().to(DEVICE), glu=True) is None
    # a config that splits K cannot fuse the norm
    with pytest.raises(ValueError, match="one split"):
        gt.fused_gemv(x, qw, scales, None, 4, 128, K, torch.ones(K).half().to(DEVICE), 1e-6,
                      config=_cfg(rows=8, unroll=2))
    # the tuner's candidates all keep K in one split
    for N2, K2, gs in ((6144, 4096, 128), (28672, 4096, 128), (28672, 4096, 64), (4096, 2048, 128)):
        cands = gt.fused_deep_configs(N2, K2, 4, gs, 132, torch.float16, glu=True)
        assert cands and all(c["rows"] * c["unroll"] >= K2 // 8 for c in cands)
    assert gt.fused_deep_configs(4096, 4096, 4, 128, 132, torch.bfloat16) == []

