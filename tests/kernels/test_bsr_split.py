"""bsr split-K: a block row's stored blocks spread over several programs that meet in the fp32 workspace.

Run under TRITON_INTERPRET=1 on the CPU (tiny shapes): every split size and split count against the dense
reference, block rows of very different lengths (empty, full, one long), M = 1 and odd M, poisoned outputs, the
workspace left zeroed for the next call, and the cached longest-row read."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bitsmith.kernels import bsr, gwint  # noqa: E402
from bitsmith.quant.groupwise import quantize_groupwise  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float16: 3e-3, torch.bfloat16: 1e-2}
pytestmark = pytest.mark.skipif(bsr.triton is None or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs Triton with a GPU or TRITON_INTERPRET=1")


def uneven_weight(N, K, block, seed):
    """[N, K] float32 weight whose block rows hold very different numbers of blocks: row 0 empty, row 1 full,
    row 2 one block, the rest random at density 0.4 (so the longest row is several times the mean)."""
    g = torch.Generator().manual_seed(seed)
    R, C = block
    NB, KB = N // R, K // C
    mask = torch.rand(NB, KB, generator=g) < 0.4
    mask[0] = False
    mask[1] = True
    mask[2] = False
    mask[2, KB // 2] = True
    w = torch.randn(N, K, generator=g) * mask.repeat_interleave(R, 0).repeat_interleave(C, 1)
    return w, mask


def weights(case, seed):
    N, K, block, values, dtype = case
    w, mask = uneven_weight(N, K, block, seed)
    if values is None:
        params, t = bsr.pack(w.to(dtype), block)
        return params, t, w.to(dtype).float()
    bits, g = values
    codes, scales, _ = quantize_groupwise(w, bits, g, True, "pow2_minus_1", dtype, None)
    qw = gwint.pack_codes(codes, bits)
    wd = gwint.dequantize(qw, scales, None, bits, g, K, dtype=torch.float32)
    params, t = bsr.from_gwint(qw, scales, None, bits, g, K, block)
    return params, t, wd


CASES = [  # N, K, block, values (None | (bits, group_size)), dtype
    (64, 256, (16, 16), None, torch.float16),
    (96, 256, (32, 16), None, torch.bfloat16),
    (64, 256, (16, 32), (4, 64), torch.float16),  # int4, one scale per block row segment (gwint scale matrix)
    (64, 256, (16, 32), (4, 16), torch.bfloat16),  # int4, per-block scales (g < C)
    (64, 256, (16, 16), (8, 128), torch.float16),
]


def run(x, t, params, bias, cfg):
    out = torch.full((x.shape[0], params["out_features"]), float("nan"), dtype=x.dtype, device=x.device)
    bsr.launch(x, t, params, bias, out, cfg)
    return out


def check(out, ref, dtype, what):
    assert torch.isfinite(out).all(), f"unwritten outputs: {what}"
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < TOL[dtype], (what, err)


def workspace_is_clean(device):
    """The split-K tile counters are back at zero (the partials need not be: they are written before read)."""
    _, cnt = bsr._split_workspace(torch.device(device), 0, 0)
    return not cnt.any()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2][0]}x{c[2][1]}-{c[3]}-{str(c[4])[6:]}")
def test_every_split_matches_the_reference(case):
    params, t, wd = weights(case, seed=sum(case[2]) + case[0])
    t = {k: v.to(DEVICE) for k, v in t.items()}
    N, K = params["out_features"], params["in_features"]
    KB = K // params["block_cols"]
    longest = bsr.max_row_blocks(t["crow_indices"], params)
    assert longest == KB  # row 1 is full
    dtype = case[4]
    g = torch.Generator().manual_seed(3)
    for M in (1, 19):
        bias = torch.randn(N, generator=g).to(dtype).to(DEVICE) if M == 19 else None
        x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
        ref = x.float().cpu() @ wd.t() + (bias.float().cpu() if bias is not None else 0)
        bm, br = (1, 8) if M == 1 else (16, 16)
        # (nblk, chunk, n_split): the split count the launcher derives (None), too few (the last split takes the
        # rest) and too many (splits with nothing to do must neither write nor count)
        for nblk, chunk, n_split in ((1, 2, None), (2, 6, None), (2, 4, 2), (1, 3, longest // 3 + 3)):
            cfg = dict(block_m=bm, block_r=br, nblk=nblk, chunk=chunk, n_split=n_split, num_warps=4, num_stages=2,
                       jmajor=nblk == 2)  # both GEMV memory orders
            out = run(x, t, params, bias, cfg).cpu()
            check(out, ref, dtype, (M, cfg))
        assert workspace_is_clean(DEVICE)


def test_split_candidates_are_valid_and_run():
    """Every candidate `configs` proposes (split or not) is a legal launch and gives the reference result."""
    case = (64, 1024, (16, 16), None, torch.float16)
    params, t, wd = weights(case, seed=5)
    t = {k: v.to(DEVICE) for k, v in t.items()}
    g = torch.Generator().manual_seed(4)
    for M in (1, 3):
        assert not any(c["chunk"] for c in bsr.configs(M, params, sms=4))  # split-K is opt-in
        cands = bsr.configs(M, params, sms=4, split=True)
        assert cands[0]["chunk"] == 0 and any(c["chunk"] for c in cands)
        x = torch.randn(M, 1024, generator=g).half().to(DEVICE)
        ref = x.float().cpu() @ wd.t()
        for cfg in cands:
            assert params["block_rows"] % cfg["block_r"] == 0 and cfg["chunk"] % cfg["nblk"] == 0
            check(run(x, t, params, None, cfg).cpu(), ref, torch.float16, (M, cfg))
    assert workspace_is_clean(DEVICE)


def test_splits_leave_an_empty_block_row_as_bias():
    params, t, _ = weights((64, 256, (16, 16), None, torch.float16), seed=6)
    bias = torch.randn(64).half()
    x = torch.randn(3, 256).half()
    for cfg in (dict(block_m=1, block_r=16, nblk=2, chunk=2), dict(block_m=16, block_r=16, nblk=2, chunk=2)):
        xi = x[:1] if cfg["block_m"] == 1 else x
        out = run(xi, t, params, bias, cfg)
        assert torch.equal(out[:, :16], bias[:16].expand(xi.shape[0], -1))  # block row 0 stores nothing


def test_longest_row_is_cached_per_tensor_and_version():
    params, t, _ = weights((64, 256, (16, 16), None, torch.float16), seed=7)
    crow = t["crow_indices"]
    assert bsr.max_row_blocks(crow, params) == 16
    assert bsr.max_row_blocks(crow, params) == 16  # cached
    fake = torch.tensor([0, 3, 5, 6, 7], dtype=torch.int32)
    assert bsr.max_row_blocks(fake, params) == 3
    fake[1:] += 10  # in place: a new version, read again
    assert bsr.max_row_blocks(fake, params) == 13
    copy = fake.clone()  # another tensor with the same values is its own entry
    assert bsr.max_row_blocks(copy, params) == 13


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[4]],
                         ids=lambda c: f"{c[2][0]}x{c[2][1]}-{c[3]}-{str(c[4])[6:]}")
def test_wide_x_tiles_split(case):
    """64- and 128-row x tiles with split-K (every partial a whole [BLOCK_M, BLOCK_R] fp32 tile), M = 33 (a
    partial x tile), 128 and 130 (two x tiles, the second of 2 rows), bias on one of them."""
    params, t, wd = weights(case, seed=11 + case[0])
    t = {k: v.to(DEVICE) for k, v in t.items()}
    N, K, dtype = params["out_features"], params["in_features"], case[4]
    R = params["block_rows"]
    g = torch.Generator().manual_seed(12)
    for M, bm, nblk, chunk, n_split in ((33, 64, 2, 4, None), (128, 128, 1, 2, None), (130, 64, 2, 2, 3)):
        bias = torch.randn(N, generator=g).to(dtype).to(DEVICE) if M == 130 else None
        x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
        ref = x.float().cpu() @ wd.t() + (bias.float().cpu() if bias is not None else 0)
        cfg = dict(block_m=bm, block_r=min(R, 32), nblk=nblk, chunk=chunk, n_split=n_split, num_warps=8,
                   num_stages=2)
        check(run(x, t, params, bias, cfg).cpu(), ref, dtype, (M, cfg))
        assert workspace_is_clean(DEVICE)


def test_thin_blocks_split():
    """The CUDA-core path (blocks under 16 rows, no tensor cores) with split-K: 4x1 int8 and 1x4 fp16 blocks."""
    g = torch.Generator().manual_seed(13)
    for block, values in (((4, 1), (8, 32)), ((1, 4), None)):
        w, _ = uneven_weight(32, 64, block, seed=14)
        if values is None:
            params, t = bsr.pack(w.half(), block)
            wd = w.half().float()
        else:
            params, t, wd = weights((32, 64, block, values, torch.float16), seed=14)
        t = {k: v.to(DEVICE) for k, v in t.items()}
        for M in (1, 5, 20):
            x = torch.randn(M, 64, generator=g).half().to(DEVICE)
            for cfg in [c for c in bsr.configs(M, params, split=True) if c["chunk"]][:2] + [
                    dict(block_m=1 if M == 1 else 16, block_r=min(4, block[0]), nblk=2, chunk=2, num_warps=4)]:
                check(run(x, t, params, None, cfg).cpu(), x.float().cpu() @ wd.t(), torch.float16, (M, cfg))
        assert workspace_is_clean(DEVICE)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2][0]}x{c[2][1]}-{c[3]}-{str(c[4])[6:]}")
def test_prefetch_tiles(case):
    """The hand-pipelined loops (`prefetch`: the next step's loads before this step's products), GEMV and mm:
    rows of 0, 1 and all blocks, one-step and many-step rows, with and without split-K, partial x tiles. Values
    in the model dtype only: quantized launches are refused (and never offered)."""
    params, t, wd = weights(case, seed=21 + case[0])
    t = {k: v.to(DEVICE) for k, v in t.items()}
    N, K, dtype = params["out_features"], params["in_features"], case[4]
    R = params["block_rows"]
    g = torch.Generator().manual_seed(22)
    runs = ((1, dict(block_m=1, block_r=8, nblk=2, chunk=0, jmajor=False)),
            (1, dict(block_m=1, block_r=16, nblk=1, chunk=3, jmajor=True)),
            (3, dict(block_m=16, block_r=16, nblk=1, chunk=0)), (19, dict(block_m=16, block_r=16, nblk=2, chunk=3)),
            (70, dict(block_m=64, block_r=min(R, 32), nblk=2, chunk=0)))
    if params["bits"]:
        # (the packed int4 GEMV of `bsr_pk` has its own prefetch loop: tests/kernels/test_bsr_pk.py)
        assert not any(c.get("prefetch") and not c.get("packed") for M in (1, 16, 128)
                       for c in bsr.configs(M, params, dtype=dtype))
        x = torch.randn(3, K, generator=g).to(dtype).to(DEVICE)
        with pytest.raises(ValueError, match="prefetch"):
            run(x, t, params, None, dict(runs[2][1], prefetch=True))
        return
    runs = tuple((M, dict(c, prefetch=True)) for M, c in runs)
    for M in (1, 16):
        cands = [c for c in bsr.configs(M, params, split=True) if c.get("prefetch")]
        assert cands and all(c["num_stages"] == 1 for c in cands)
        runs += tuple((M, c) for c in cands[:2])
    for M, cfg in runs:
        x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
        bias = torch.randn(N, generator=g).to(dtype).to(DEVICE) if M == 19 else None
        ref = x.float().cpu() @ wd.t() + (bias.float().cpu() if bias is not None else 0)
        cfg = dict(cfg, num_warps=4, num_stages=1)
        check(run(x, t, params, bias, cfg).cpu(), ref, dtype, (M, cfg))
    assert workspace_is_clean(DEVICE)


def test_row_order_longest_first_and_cached():
    params, t, _ = weights((64, 256, (16, 16), None, torch.float16), seed=31)
    crow = t["crow_indices"]
    lengths = (crow[1:] - crow[:-1]).tolist()
    order = bsr.row_order(crow, params, 8).tolist()  # two row tiles per block row
    assert sorted(order) == list(range(64 // 8))
    rows = [order[i] // 2 for i in range(0, len(order), 2)]
    assert [order[i + 1] for i in range(0, len(order), 2)] == [2 * r + 1 for r in rows]
    assert [lengths[r] for r in rows] == sorted(lengths, reverse=True)
    assert bsr.row_order(crow, params, 8) is bsr.row_order(crow, params, 8)  # cached
    crow[1:] += 0  # in place: a new version, computed again
    assert bsr.row_order(crow, params, 8).tolist() == order


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]],
                         ids=lambda c: f"{c[2][0]}x{c[2][1]}-{c[3]}-{str(c[4])[6:]}")
def test_ordered_launches(case):
    """`order` (row tiles longest block row first) on the GEMV, mm and packed int4 kernels, with and without
    split-K and prefetch: the same results as the reference, every row written."""
    params, t, wd = weights(case, seed=41 + case[0])
    t = {k: v.to(DEVICE) for k, v in t.items()}
    N, K, dtype = params["out_features"], params["in_features"], case[4]
    g = torch.Generator().manual_seed(42)
    runs = [(1, dict(block_m=1, block_r=8, nblk=2, chunk=0, jmajor=False)),
            (1, dict(block_m=1, block_r=8, nblk=1, chunk=3, jmajor=False)),
            (19, dict(block_m=16, block_r=16, nblk=2, chunk=0)), (19, dict(block_m=16, block_r=16, nblk=1, chunk=3))]
    if params["bits"] is None:
        runs += [(M, dict(c, prefetch=True, num_stages=1)) for M, c in runs]
    elif dtype == torch.float16 and params["bits"] == 4:
        runs += [(1, c) for c in bsr.configs(1, params) if c.get("order") and c.get("packed")]
    for M, cfg in runs:
        cfg = dict(cfg, order=True)
        x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
        bias = torch.randn(N, generator=g).to(dtype).to(DEVICE) if M == 19 else None
        ref = x.float().cpu() @ wd.t() + (bias.float().cpu() if bias is not None else 0)
        check(run(x, t, params, bias, cfg).cpu(), ref, dtype, (M, cfg))
    assert workspace_is_clean(DEVICE)
