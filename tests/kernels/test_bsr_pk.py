"""bsr packed int4 GEMV (`bitsmith.kernels.bsr_pk`): fp16x2 dequantization, hand-pipelined loads.

Under TRITON_INTERPRET=1 the kernel runs its plain-Triton twin of the inline PTX (`_pkb_ref`, the same fp16
arithmetic); on a GPU the PTX itself. Against the dense fp32 reference of the dequantized weight: block widths 16,
32 and 64, block rows empty / one block / full, group sizes a multiple of the block width and one group for the
whole row, every tile option with and without prefetch and split-K, bias, NaN-poisoned outputs."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bitsmith.kernels import bsr, bsr_pk, gwint  # noqa: E402
from bitsmith.quant.groupwise import quantize_groupwise  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(bsr.triton is None or not (ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"),
                                reason="needs Triton with a GPU or TRITON_INTERPRET=1")


def int4_weight(N, K, block, group_size, seed, dtype=torch.float16):
    """int4 bsr weight with block row 0 empty, row 1 full, row 2 a single block, the rest at density 0.4."""
    g = torch.Generator().manual_seed(seed)
    R, C = block
    NB, KB = N // R, K // C
    mask = torch.rand(NB, KB, generator=g) < 0.4
    mask[0] = False
    mask[1] = True
    mask[2] = False
    mask[2, KB - 1] = True
    w = torch.randn(N, K, generator=g) * mask.repeat_interleave(R, 0).repeat_interleave(C, 1)
    codes, scales, _ = quantize_groupwise(w, 4, group_size, True, "pow2_minus_1", dtype, None)
    qw = gwint.pack_codes(codes, 4)
    wd = gwint.dequantize(qw, scales, None, 4, group_size, K, dtype=torch.float32)
    params, t = bsr.from_gwint(qw, scales, None, 4, group_size, K, block)
    return params, {k: v.to(DEVICE) for k, v in t.items()}, wd


def run(x, t, params, bias, cfg):
    out = torch.full((x.shape[0], params["out_features"]), float("nan"), dtype=x.dtype, device=x.device)
    bsr.launch(x, t, params, bias, out, cfg)
    return out


def rel(out, ref):
    assert torch.isfinite(out).all(), "unwritten or non-finite outputs"
    return ((out.double().cpu() - ref.double()).norm() / ref.double().norm()).item()


CASES = [  # N, K, block, group_size
    (64, 512, (16, 32), 128),  # scales per 4 blocks
    (96, 256, (32, 32), 32),  # one scale per block
    (128, 512, (32, 64), 512),  # one group for the whole row
    (48, 256, (16, 16), 64),  # two code words per block row (one pair)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2][0]}x{c[2][1]}-g{c[3]}")
def test_packed_gemv_matches_reference(case):
    N, K, block, gs = case
    params, t, wd = int4_weight(N, K, block, gs, seed=N + K)
    assert bsr_pk.ok(params, torch.float16)
    g = torch.Generator().manual_seed(3)
    cands = [c for c in bsr.configs(1, params, split=True, clamp=False, ell=False) if c.get("packed")]  # (own tests)
    assert cands and cands[0] == bsr.configs(1, params)[0]  # the packed tiles come first
    extra = [dict(block_m=1, block_r=min(4, block[0]), nblk=2, chunk=0, packed=True, prefetch=pf) for pf in (0, 1)]
    extra += [dict(block_m=1, block_r=min(8, block[0]), nblk=1, chunk=1, packed=True, prefetch=True),  # 1-block splits
              dict(block_m=1, block_r=block[0], nblk=4, chunk=4, n_split=64, packed=True, prefetch=True)]
    for i, cfg in enumerate(cands + extra):
        x = torch.randn(1, K, generator=g).half()
        bias = torch.randn(N, generator=g).half() if i % 2 else None
        ref = x.float() @ wd.t() + (bias.float() if bias is not None else 0)
        out = run(x.to(DEVICE), t, params, bias.to(DEVICE) if bias is not None else None, cfg)
        # fp16 partial sums over 8 products per half, like gwint's packed GEMV
        assert rel(out, ref) < 3e-3, cfg
        if bias is not None:  # block row 0 stores nothing: the bias, exactly
            assert torch.equal(out[0, :block[0]].cpu(), bias[:block[0]])
    _, cnt = bsr._split_workspace(torch.device(DEVICE), 0, 0)
    assert not cnt.any()



@pytest.mark.parametrize("case", CASES[:3] + [(96, 1024, (32, 32), 128), (3, 256, (1, 32), 64)],
                         ids=lambda c: f"{c[0]}x{c[1]}-{c[2][0]}x{c[2][1]}-g{c[3]}")
def test_clamped_gemv_matches_reference(case):
    """`clamp` tiles (no masked loads: slots past a row's end re-read its last block and add nothing): the tuner's
    clamp tiles and small ones, with bias, whole rows (a full 32-block row: many steps, a last partial step),
    empty and one-block rows, odd N with 1-row blocks, forced splits (the split epilogue, ranges ending mid-step)."""
    N, K, block, gs = case
    params, t, wd = int4_weight(N, K, block, gs, seed=N + K + 1)
    tiles = [c for c in bsr.configs(1, params, clamp=True) if c.get("clamp")]
    assert len(tiles) >= 4 and not any(c.get("clamp") for c in bsr.configs(1, params, clamp=False))
    g = torch.Generator().manual_seed(4)
    small = [dict(block_m=1, block_r=min(br, block[0]), nblk=nb, chunk=ch, packed=True, prefetch=False, clamp=True,
                  **({"n_split": ns} if ns else {}))
             for br, nb, ch, ns in ((1, 1, 0, 0), (4, 2, 0, 0), (2, 1, 3, 0), (4, 2, 2, 64), (4, 4, 4, 2))]
    for i, cfg in enumerate(tiles[::3] + small):
        x = torch.randn(1, K, generator=g).half()
        bias = torch.randn(N, generator=g).half() if i % 2 else None
        ref = x.float() @ wd.t() + (bias.float() if bias is not None else 0)
        out = run(x.to(DEVICE), t, params, bias.to(DEVICE) if bias is not None else None, cfg)
        assert rel(out, ref) < 3e-3, cfg
    _, cnt = bsr._split_workspace(torch.device(DEVICE), 0, 0)
    assert not cnt.any()


def uniform_weight(N, K, block, group_size, count, seed, dtype=torch.float16):
    """int4 bsr weight whose every block row holds `count` blocks (row-balanced, as `scope: row` prunes), through
    the gwint -> bsr packing (`bsr.from_gwint` with the mask); count 0: all rows empty, K / C: all full."""
    g = torch.Generator().manual_seed(seed)
    R, C = block
    NB, KB = N // R, K // C
    idx = torch.rand(NB, KB, generator=g).argsort(dim=1)[:, :count]
    mask = torch.zeros(NB, KB, dtype=torch.bool).scatter_(1, idx, True)
    w = torch.randn(N, K, generator=g) * mask.repeat_interleave(R, 0).repeat_interleave(C, 1)
    codes, scales, _ = quantize_groupwise(w, 4, group_size, True, "pow2_minus_1", dtype, None)
    qw = gwint.pack_codes(codes, 4)
    wd = gwint.dequantize(qw, scales, None, 4, group_size, K, dtype=torch.float32)
    params, t = bsr.from_gwint(qw, scales, None, 4, group_size, K, block, mask=mask)
    assert torch.equal(bsr.dequantize(t, params, torch.float32), wd)  # the packing round-trips exactly
    return params, {k: v.to(DEVICE) for k, v in t.items()}, wd


UNIFORM_CASES = [  # N, K, block, group_size, blocks per block row
    (64, 1024, (32, 32), 128, 13),  # 13 of 32: steps of 16 / 32 / 64 end inside the row
    (96, 512, (16, 32), 512, 16),  # full rows, one group per row
    (64, 256, (32, 32), 128, 0),  # all rows empty: bias or zeros
    (3, 256, (1, 32), 64, 3),  # odd N, 1-row blocks
    (48, 512, (16, 16), 64, 5),  # 16-wide blocks (one word pair per block row)
]


@pytest.mark.parametrize("case", UNIFORM_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2][0]}x{c[2][1]}-c{c[4]}")
def test_ell_gemv_matches_reference(case):
    """`ell` tiles on equal block rows: the crow-free loop ("loop": plain, prefetch, clamp) and the unrolled kernel
    ("unrolled"), every tuner tile and small ones, with and without bias, forced splits of the loop tiles."""
    N, K, block, gs, count = case
    params, t, wd = uniform_weight(N, K, block, gs, count, seed=N + K + count)
    assert bsr.uniform_row_blocks(t["crow_indices"]) == count
    tiles = [c for c in bsr.configs(1, params) if c.get("ell")]
    assert {c["ell"] for c in tiles} == {"loop", "unrolled"} and not any(
        c.get("ell") for c in bsr.configs(1, params, ell=False))
    small = [dict(block_m=1, block_r=min(br, block[0]), nblk=nb, chunk=ch, packed=True, prefetch=pf, ell=e,
                  clamp=e == "unrolled", **({"n_split": ns} if ns else {}))
             for br, nb, ch, ns, pf, e in ((1, 1, 0, 0, False, "unrolled"), (4, 2, 0, 0, False, "unrolled"),
                                           (2, 4, 0, 0, True, "loop"), (4, 2, 2, 0, False, "loop"),
                                           (4, 2, 2, 64, True, "loop"))]
    g = torch.Generator().manual_seed(5)
    for i, cfg in enumerate(tiles + small):
        x = torch.randn(1, K, generator=g).half()
        bias = torch.randn(N, generator=g).half() if i % 2 else None
        ref = x.float() @ wd.t() + (bias.float() if bias is not None else 0)
        out = run(x.to(DEVICE), t, params, bias.to(DEVICE) if bias is not None else None, cfg)
        if count == 0:  # nothing stored: exactly the bias, or zeros
            assert torch.equal(out[0].cpu(), bias if bias is not None else torch.zeros(N, dtype=torch.float16))
        else:
            assert rel(out, ref) < 3e-3, cfg
    _, cnt = bsr._split_workspace(torch.device(DEVICE), 0, 0)
    assert not cnt.any()


def test_ell_tiles_fall_back_on_unequal_rows():
    """An `ell` config on a weight whose block rows differ (empty, full, one-block rows) runs the crow kernel of
    the same tile (its clamp form for "unrolled"): the same results as the plain tiles."""
    params, t, wd = int4_weight(96, 1024, (32, 32), 128, seed=21)
    assert bsr.uniform_row_blocks(t["crow_indices"]) is None
    g = torch.Generator().manual_seed(6)
    for cfg in [c for c in bsr.configs(1, params) if c.get("ell")][::2]:
        x = torch.randn(1, 1024, generator=g).half()
        assert rel(run(x.to(DEVICE), t, params, None, cfg), x.float() @ wd.t()) < 3e-3, cfg


def test_ell_bf16_and_row_extent_cache():
    """bf16 activations never take a packed (`ell`) tile: on equal rows the tuner's first tile (the fp32 GEMV)
    matches the reference with bias. The row extent is read once per crow tensor and follows in-place edits."""
    params, t, wd = uniform_weight(64, 512, (32, 32), 128, 5, seed=9, dtype=torch.bfloat16)
    assert not any(c.get("ell") or c.get("packed") for c in bsr.configs(1, params, dtype=torch.bfloat16))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 512, generator=g).bfloat16()
    bias = torch.randn(64, generator=g).bfloat16()
    ref = x.float() @ wd.t() + bias.float()
    out = bsr.triton_linear(x.to(DEVICE), t, params, bias.to(DEVICE))
    assert rel(out, ref) < 1e-2
    crow = t["crow_indices"].clone()
    assert bsr.uniform_row_blocks(crow) == 5 and bsr.max_row_blocks(crow, params) == 5
    crow[-1] += 1  # block rows of 5 and 6 (an in-place edit: a new version of the same tensor)
    assert bsr.uniform_row_blocks(crow) is None and bsr.max_row_blocks(crow, params) == 6
    assert bsr.uniform_row_blocks(crow[:1]) == 0  # no block rows


def test_packed_gemv_falls_back_on_unaligned_x():
    """x whose storage offset is not a multiple of four halves cannot be read as int64 words: the fp32 path of
    the same tile runs instead, with the same result."""
    params, t, wd = int4_weight(64, 256, (16, 32), 128, seed=5)
    big = torch.randn(1, 257, generator=torch.Generator().manual_seed(6)).half()
    x = big[:, 1:]  # storage offset 1
    with pytest.raises(RuntimeError):
        x.view(torch.int64)
    cfg = bsr.configs(1, params)[0]
    assert cfg.get("packed")
    out = run(x.to(DEVICE), t, params, None, cfg)
    assert rel(out, x.float() @ wd.t()) < 3e-3
    assert rel(bsr.triton_linear(x.to(DEVICE), t, params, config=cfg), x.float() @ wd.t()) < 3e-3


def test_packed_applicability_and_refusals():
    params, t, _ = int4_weight(48, 128, (16, 32), 64, seed=7)
    assert bsr_pk.ok(params, torch.float16) and not bsr_pk.ok(params, torch.bfloat16)
    assert not bsr_pk.ok({**params, "bits": 8}, torch.float16)
    assert not bsr_pk.ok({**params, "group_size": 16}, torch.float16)  # per-block scales (g < C)
    assert not bsr_pk.ok({**params, "block_cols": 8}, torch.float16)  # one code word per block row
    assert not any(c.get("packed") for c in bsr.configs(1, params, dtype=torch.bfloat16))
    assert not any(c.get("packed") for M in (2, 16, 128) for c in bsr.configs(M, params))
    cfg = bsr.configs(1, params)[0]
    with pytest.raises(ValueError, match="packed"):
        run(torch.randn(1, 128).bfloat16().to(DEVICE), t, params, None, cfg)
    with pytest.raises(ValueError, match="packed"):
        run(torch.randn(2, 128).half().to(DEVICE), t, params, None, dict(cfg, block_m=16))


if bsr.triton is not None:
    import triton
    import triton.language as tl

    from bitsmith.kernels.bsr_pk import _pkb_ref

    @triton.jit
    def _twin_kernel(w_ptr, x_ptr, o_ptr, T: tl.constexpr):
        i = tl.arange(0, T)
        r = _pkb_ref(tl.load(w_ptr + i), tl.load(w_ptr + T + i), tl.load(x_ptr + i), tl.load(x_ptr + T + i),
                     tl.load(x_ptr + 2 * T + i), tl.load(x_ptr + 3 * T + i))
        tl.store(o_ptr + i, r)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the twin runs under the interpreter")
def test_twin_matches_unpacked_codes():
    """The interpreter twin's arithmetic, element by element: code words and x words in, the fp32 dot out (the
    fp16 partial sums round: a loose tolerance)."""
    g = torch.Generator().manual_seed(8)
    T = 16
    w = torch.randint(-2**31, 2**31 - 1, (2, T), generator=g, dtype=torch.int64).to(torch.int32)
    xs = torch.randn(4, T, 4, generator=g).half()  # low / high x of word 0, low / high x of word 1
    out = torch.empty(T)
    _twin_kernel[(1,)](w, xs.view(torch.int64).reshape(4, T).contiguous(), out, T=T)
    ref = torch.zeros(T, dtype=torch.float64)
    for j in range(2):
        wb = w[j].to(torch.int64) & 0xFFFFFFFF
        for byte in range(4):  # byte k: column k (low nibble) and column k + C/2 (high nibble)
            b = (wb >> (8 * byte)) & 0xFF
            ref += ((b & 0xF) - 8).double() * xs[2 * j, :, byte].double()
            ref += ((b >> 4) - 8).double() * xs[2 * j + 1, :, byte].double()
    assert torch.allclose(out.double(), ref, rtol=2e-2, atol=2e-2)
