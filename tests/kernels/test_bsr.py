"""bsr: packing round trips, gwint conversion, the CPU path, and the Triton kernel (TRITON_INTERPRET=1 on CPU) against
the dense reference on random masks and shapes, with empty block rows and fully dense block rows."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bitsmith.compress.formats import check_module_entry, get_format  # noqa: E402
from bitsmith.compress.errors import CheckpointError  # noqa: E402
from bitsmith.kernels import bsr, bsr_cpu, gwint  # noqa: E402
from bitsmith.quant.groupwise import quantize_groupwise  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
needs_triton = pytest.mark.skipif(bsr.triton is None or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                                  reason="needs Triton with a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if ON_GPU else "cpu"


def sparse_weight(N, K, block, density, seed, empty_row=True, dense_row=True):
    """Random [N, K] float32 weight with a random block mask; block row 0 empty and the last one full."""
    g = torch.Generator().manual_seed(seed)
    R, C = block
    mask = torch.rand(N // R, K // C, generator=g) < density
    if empty_row:
        mask[0] = False
    if dense_row:
        mask[-1] = True
    w = torch.randn(N, K, generator=g) * (mask.repeat_interleave(R, 0).repeat_interleave(C, 1))
    return w, mask


def rel(out, ref):
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def quantized(w, bits, group_size, dtype, block):
    codes, scales, _ = quantize_groupwise(w, bits, group_size, True, "pow2_minus_1", dtype, None)
    qw = gwint.pack_codes(codes, bits)
    wd = gwint.dequantize(qw, scales, None, bits, group_size, w.shape[1], dtype=torch.float32)
    params, tensors = bsr.from_gwint(qw, scales, None, bits, group_size, w.shape[1], block)
    return params, tensors, wd


# ---------------------------------------------------------------------------------------------------- layout

@pytest.mark.parametrize("block", [(1, 4), (4, 1), (16, 16), (8, 32)])
def test_pack_round_trip_and_index(block):
    w, mask = sparse_weight(64, 128, block, 0.3, seed=1)
    params, t = bsr.pack(w.to(torch.bfloat16), block)
    assert check_module_entry("m", {"format": "bsr", "format_version": 1, **params})
    assert torch.equal(bsr.dequantize(t, params), w.to(torch.bfloat16))
    crow, col = t["crow_indices"], t["col_indices"]
    assert crow.dtype == col.dtype == torch.int32
    assert int(crow[0]) == 0 and int(crow[-1]) == params["nnz_blocks"] == int(mask.sum())
    assert int(crow[1]) == 0  # block row 0 is empty
    assert int(crow[-1] - crow[-2]) == 128 // block[1]  # the last block row is full
    for r in range(mask.shape[0]):  # columns strictly increasing within a row and equal to the mask
        cols = col[crow[r]:crow[r + 1]].tolist()
        assert cols == sorted(set(cols)) == mask[r].nonzero().squeeze(1).tolist()
    assert t["values"].shape == (params["nnz_blocks"], *block)
    specs = get_format("bsr").tensor_specs(params, torch.bfloat16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == specs


def test_block_mask_drops_only_zero_blocks():
    w = torch.zeros(8, 8)
    w[0, 5] = 1e-30  # one tiny nonzero keeps its block
    m = bsr.block_mask(w, (4, 4))
    assert m.tolist() == [[False, True], [False, False]]
    params, t = bsr.pack(w, (4, 4))
    assert params["nnz_blocks"] == 1 and torch.equal(bsr.dequantize(t, params), w)


@pytest.mark.parametrize("bits,group_size,block", [(8, 64, (16, 32)), (4, 64, (16, 32)), (4, 16, (16, 32)),
                                                   (8, 128, (4, 1)), (4, 32, (1, 4))])
def test_from_gwint_is_exact(bits, group_size, block):
    w, mask = sparse_weight(32, 128, block, 0.4, seed=2)
    params, t, wd = quantized(w, bits, group_size, torch.float16, block)
    assert params["bits"] == bits and params["nnz_blocks"] == int(mask.sum())
    assert params["group_size"] == group_size
    per_block = group_size < block[1]
    assert t["scales"].shape == ((params["nnz_blocks"], block[0], block[1] // group_size) if per_block
                                 else (128 // group_size, 32))
    assert torch.equal(bsr.dequantize(t, params, torch.float32), wd)
    assert t["qvalues"].shape[-1] == (block[1] if bits == 8 else block[1] // 2)
    # bits per weight: at 40% density int4 blocks cost far less than the dense fp16 weight
    assert get_format("bsr").bits_per_weight(params, torch.float16) < 16 * 0.4 + 1


def test_int4_nibble_order():
    codes = torch.arange(16, dtype=torch.uint8).reshape(1, 16)
    packed = bsr.pack_codes4(codes)
    assert packed.tolist() == [[0 | (8 << 4), 1 | (9 << 4), 2 | (10 << 4), 3 | (11 << 4), 4 | (12 << 4),
                                5 | (13 << 4), 6 | (14 << 4), 7 | (15 << 4)]]
    assert torch.equal(bsr.unpack_codes4(packed), codes)


def test_from_gwint_refuses_what_it_cannot_store():
    w, _ = sparse_weight(16, 96, (4, 32), 0.5, seed=3)
    codes, scales, zeros = quantize_groupwise(w, 4, 48, False, "pow2_minus_1", torch.float16, None)
    with pytest.raises(ValueError, match="asymmetric"):
        bsr.from_gwint(gwint.pack_codes(codes, 4), scales, zeros, 4, 48, 96, (4, 32))
    codes, scales, _ = quantize_groupwise(w, 4, 48, True, "pow2_minus_1", torch.float16, None)
    with pytest.raises(ValueError, match="do not nest"):
        bsr.from_gwint(gwint.pack_codes(codes, 4), scales, None, 4, 48, 96, (4, 32))


@pytest.mark.parametrize("bad,match", [({"block_rows": 3}, "does not tile"), ({"nnz_blocks": 10**6}, "nnz_blocks"),
                                       ({"bits": 3}, "bits"), ({"bits": 4, "group_size": 5}, "group_size"),
                                       ({"group_size": 16}, "only allowed"), ({"block_cols": 0}, "block_cols")])
def test_config_entry_validation(bad, match):
    entry = {"format": "bsr", "format_version": 1, "in_features": 64, "out_features": 32, "block_rows": 16,
             "block_cols": 16, "nnz_blocks": 4, "bits": None, "group_size": None}
    check_module_entry("m", entry)
    with pytest.raises(CheckpointError, match=match):
        check_module_entry("m", {**entry, **bad})


# ------------------------------------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("block,density", [((16, 16), 0.1), ((8, 8), 0.3), ((4, 1), 0.2)])
def test_cpu_paths_match_reference(block, density):
    w, _ = sparse_weight(64, 96, block, density, seed=4)
    params, t = bsr.pack(w, block)
    bias = torch.randn(64)
    for M in (1, 7, 300):
        x = torch.randn(2, M, 96)
        ref = torch.nn.functional.linear(x, w, bias)
        assert rel(bsr_cpu.gather_linear(x, t, params, bias), ref) < 1e-5
        assert rel(bsr_cpu.csr_linear(x, t, params, bias), ref) < 1e-5
        assert rel(bsr.linear(x, t, params, bias), ref) < 1e-5  # the dispatcher's choice
    qp, qt, wd = quantized(w, 8, 32, torch.bfloat16, block) if block[1] > 1 else (None, None, None)
    if qp is not None:
        x = torch.randn(5, 96)
        assert rel(bsr_cpu.gather_linear(x, qt, qp), x @ wd.t()) < 1e-5


def test_cpu_dispatch_and_csr_cache():
    w, _ = sparse_weight(64, 64, (1, 4), 0.1, seed=5, dense_row=False)
    params, t = bsr.pack(w, (1, 4))
    assert bsr_cpu.choose(params, 1) == "csr"
    x = torch.randn(3, 64)
    assert rel(bsr.linear(x, t, params), x @ w.t()) < 1e-5
    t["values"].mul_(2)  # an in-place change of the stored values invalidates the cached CSR matrix
    assert rel(bsr.linear(x, t, params), 2 * x @ w.t()) < 1e-5
    big, _ = sparse_weight(64, 64, (32, 32), 0.1, seed=6, empty_row=False, dense_row=False)
    p2, _ = bsr.pack(big, (32, 32), torch.rand(2, 2) < 2)  # all four blocks stored: density 1
    assert bsr_cpu.choose(p2, 1) == "dense"
    p3 = {**p2, "nnz_blocks": 1}
    assert bsr_cpu.choose(p3, 1) == "gather" and bsr_cpu.choose(p3, 128) == "dense"


def test_cpu_empty_matrix():
    params, t = bsr.pack(torch.zeros(32, 32), (16, 16))
    assert params["nnz_blocks"] == 0
    y = bsr.linear(torch.randn(3, 32), t, params, torch.ones(32))
    assert torch.equal(y, torch.ones(3, 32))


# ---------------------------------------------------------------------------------------------------- Triton

KERNEL_CASES = [  # N, K, block, density, values (None | (bits, group_size)), dtype
    (64, 128, (16, 16), 0.4, None, torch.float16),
    (96, 64, (32, 32), 0.5, None, torch.bfloat16),
    (64, 128, (16, 32), 0.5, (8, 128), torch.float16),
    (64, 128, (16, 32), 0.5, (8, 16), torch.bfloat16),
    (64, 128, (32, 64), 0.5, (4, 64), torch.float16),
    (64, 128, (16, 32), 0.5, (4, 16), torch.bfloat16),
    (32, 64, (16, 16), 0.5, (4, 16), torch.float16),  # int4 with C/2 = 8: no tensor cores
    (16, 32, (1, 4), 0.3, None, torch.float16),
    (16, 32, (4, 1), 0.3, (8, 32), torch.float16),
]


@needs_triton
@pytest.mark.parametrize("N,K,block,density,values,dtype", KERNEL_CASES)
def test_triton_kernel_against_dense_reference(N, K, block, density, values, dtype):
    w, _ = sparse_weight(N, K, block, density, seed=N + K + block[0])
    if values is None:
        params, t = bsr.pack(w.to(dtype), block)
        wd = w.to(dtype).float()
    else:
        params, t, wd = quantized(w, values[0], values[1], dtype, block)
    t = {k: v.to(DEVICE) for k, v in t.items()}
    g = torch.Generator().manual_seed(7)
    ms = (1, 3, 33) if block[0] >= 16 else (1, 5)
    for M in ms:
        for cfg in bsr.configs(M, params, dtype=dtype)[:2]:
            bias = torch.randn(N, generator=g).to(dtype) if M == 3 else None
            x = torch.randn(M, K, generator=g).to(dtype)
            ref = x.float() @ wd.t() + (bias.float() if bias is not None else 0)
            out = bsr.triton_linear(x.to(DEVICE), t, params, bias.to(DEVICE) if bias is not None else None,
                                    config=cfg).cpu()
            assert out.dtype == dtype and out.shape == (M, N)
            assert rel(out, ref) < TOL[dtype], (M, cfg)


@needs_triton
def test_triton_empty_rows_are_written():
    """Block rows with no stored block must come out as zeros (or the bias), never as leftover memory."""
    w, mask = sparse_weight(64, 64, (16, 16), 0.5, seed=9)
    params, t = bsr.pack(w.half(), (16, 16))
    empty = (~mask.any(dim=1)).nonzero().squeeze(1).tolist()
    assert 0 in empty
    x = torch.randn(4, 64).half()
    bias = torch.randn(64).half()
    out = bsr.triton_linear(x, t, params, bias)
    for r in empty:
        assert torch.equal(out[:, r * 16:(r + 1) * 16], bias[r * 16:(r + 1) * 16].expand(4, -1))


@needs_triton
def test_dispatch_uses_triton_when_forced(monkeypatch):
    w, _ = sparse_weight(32, 64, (16, 16), 0.5, seed=11)
    params, t = bsr.pack(w.half(), (16, 16))
    called = []
    real = bsr.triton_linear
    monkeypatch.setattr(bsr, "triton_linear", lambda *a, **k: called.append(1) or real(*a, **k))
    monkeypatch.setenv("BITSMITH_TRITON", "1")
    x = torch.randn(2, 64).half()
    assert rel(bsr.linear(x, t, params), x.float() @ w.half().float().t()) < 3e-3 and called
    monkeypatch.setenv("BITSMITH_TRITON", "0")
    called.clear()
    bsr.linear(x, t, params)
    assert not called
