"""bsr_thin: the window table against a brute-force reading of the mask, and the thin-block kernel (TRITON_INTERPRET=1
on CPU) against the dense float reference: M = 1, 2, 3, 16, 128, odd N, an empty and a full block row, a K that
ends inside a window, bf16 with bias, 1x4 blocks (16 slots per window), 2x16 blocks, every candidate tile and
split, forced split counts (too few, too many), NaN-poisoned outputs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bitsmith.kernels import bsr, bsr_thin  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2}
needs_triton = pytest.mark.skipif(bsr.triton is None or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs Triton with a GPU or TRITON_INTERPRET=1")


def thin_weight(N, K, block, density, seed, dtype=torch.float16):
    """(params, tensors, dense float32 weight) with block row 0 empty and the last one full."""
    g = torch.Generator().manual_seed(seed)
    R, C = block
    mask = torch.rand(N // R, K // C, generator=g) < density
    mask[0] = False
    mask[-1] = True
    w = torch.randn(N, K, generator=g) * mask.repeat_interleave(R, 0).repeat_interleave(C, 1)
    params, t = bsr.pack(w.to(dtype), block)
    t = {k: v.to(DEVICE) for k, v in t.items()}
    return params, t, bsr.dequantize(t, params, torch.float32)


def rel(out, ref):
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def run(x, t, params, cfg, bias=None):
    out = torch.full((x.shape[0], params["out_features"]), float("nan"), dtype=x.dtype, device=DEVICE)
    bsr.launch(x, t, params, bias, out, cfg)
    return out


@pytest.mark.parametrize("block,K,slots", [((1, 16), 256, 4), ((1, 16), 80, 4), ((1, 4), 64, 16), ((2, 16), 96, 2)])
def test_window_table_matches_mask(block, K, slots):
    params, t, wd = thin_weight(12, K, block, 0.4, seed=3)
    table = bsr_thin.window_table(t, params, slots).cpu()
    R, C = block
    mask = (wd.reshape(12 // R, R, K // C, C) != 0).any(3).any(1)  # [NB, KB]
    NW = -(-(K // C) // slots)
    assert table.shape == (NW, 12 // R) and table.dtype == torch.int32
    for r in range(mask.shape[0]):
        for w in range(NW):
            cols = range(w * slots, min((w + 1) * slots, K // C))
            bits = sum(1 << (c - w * slots) for c in cols if mask[r, c])
            before = int(mask[r, :w * slots].sum())
            assert int(table[w, r]) == (before << 16 | bits)
    assert bsr_thin.window_table(t, params, slots) is bsr_thin.window_table(t, params, slots)  # cached


@needs_triton
@pytest.mark.parametrize("M", [1, 2, 3, 16, 128])
def test_thin_kernel_matches_dense(M):
    params, t, wd = thin_weight(97, 256, (1, 16), 0.5, seed=M)  # odd N
    x = torch.randn(M, 256, device=DEVICE).half()
    ref = x.float() @ wd.t()
    cands = bsr_thin.configs(M, params)
    assert cands and all(c["thin"] for c in cands)
    for cfg in cands[:3] + [dict(cands[0], chunk=0)]:
        assert rel(run(x, t, params, cfg), ref) < TOL[torch.float16], cfg


@needs_triton
def test_thin_kernel_splits_and_forced_counts():
    params, t, wd = thin_weight(64, 512, (1, 16), 0.5, seed=5)
    x = torch.randn(16, 512, device=DEVICE).half()
    ref = x.float() @ wd.t()
    cfg = dict(thin=True, block_m=16, block_n=32, kt=64, chunk=2, num_warps=4, num_stages=3)  # 8 windows, 4 splits
    # the last split takes what is left; unroll: the last split sums four partials per iteration (8 or 3 parts)
    for extra in ({}, {"n_split": 2}, {"n_split": 64}, {"chunk": 3}, {"unroll": 4, "chunk": 1},
                  {"unroll": 4, "chunk": 3}, {"unroll": 4, "n_split": 64}):
        assert rel(run(x, t, params, dict(cfg, **extra)), ref) < TOL[torch.float16], extra
    if ON_GPU:
        _, cnt = bsr._split_workspace(torch.device(DEVICE), 0, 0)
        assert not cnt.any()


@needs_triton
@pytest.mark.parametrize("block,N,K,dtype,bias", [((1, 16), 33, 80, torch.bfloat16, True),
                                                  ((1, 4), 40, 128, torch.float16, True),
                                                  ((2, 16), 64, 96, torch.float16, False)])
def test_thin_kernel_shapes_bias_dtypes(block, N, K, dtype, bias):
    params, t, wd = thin_weight(N, K, block, 0.5, seed=7, dtype=dtype)
    b = torch.randn(N, device=DEVICE).to(dtype) if bias else None
    for M in (3, 17):
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        ref = x.float() @ wd.t() + (b.float() if bias else 0)
        for cfg in bsr_thin.configs(M, params)[:2]:
            assert rel(run(x, t, params, cfg, b), ref) < TOL[dtype], (M, cfg)


def test_dispatch_offers_thin_first_for_thin_blocks_only():
    params, _, _ = thin_weight(64, 128, (1, 16), 0.5, seed=1)
    assert bsr.configs(16, params)[0].get("thin")
    assert not any(c.get("thin") for c in bsr.configs(1, params))  # M = 1: the GEMV
    assert not bsr.configs(16, params)[-1].get("thin")  # the multiply-reduce path stays a candidate
    sq = dict(params, block_rows=16, block_cols=16, nnz_blocks=4)
    assert not any(c.get("thin") for c in bsr.configs(16, sq))
    q = dict(params, bits=4, group_size=128)
    assert not bsr_thin.ok(q, torch.float16) and not any(c.get("thin") for c in bsr.configs(16, q))
    with pytest.raises(ValueError, match="window"):
        bsr_thin.launch(torch.zeros(2, 128, dtype=torch.float16), {}, params, None, None,
                        dict(thin=True, block_m=16, block_n=32, kt=8, chunk=0))


@needs_triton
def test_public_op_takes_the_thin_path():
    params, t, wd = thin_weight(48, 128, (1, 16), 0.5, seed=9)
    x = torch.randn(2, 5, 128, device=DEVICE).half()
    y = bsr.triton_linear(x, t, params)
    assert y.shape == (2, 5, 48)
    assert rel(y.reshape(10, 48), x.reshape(10, 128).float() @ wd.t()) < TOL[torch.float16]
