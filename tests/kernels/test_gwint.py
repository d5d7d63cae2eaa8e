"""gwint: packing round trips, and every Triton kernel regime against the torch reference (TRITON_INTERPRET=1 on CPU).

The CPU interpreter cannot do bf16 arithmetic (it stores bf16 as raw uint16): the kernels keep elementwise math in
fp32 for bf16, and under the interpreter only the bf16 `tl.dot` is replaced by an fp32 dot of bf16-rounded operands
(`DOT_F32`). The real bf16 tensor-core dot is checked on the GPU by benchmarks/bench_kernels.py --check.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from bitsmith.kernels import gwint  # noqa: E402

triton = pytest.importorskip("triton")
from bitsmith.kernels import gwint_triton as gt  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1")
TOL = {torch.float16: 3e-3, torch.bfloat16: 8e-3}  # relative Frobenius error vs the fp32 reference


def _make(N, K, bits, group_size, sym, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=g)
    G = gwint.num_groups(K, group_size)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.002).to(dtype)
    zeros = None if sym else torch.randint(0, 1 << bits, (G, N), dtype=torch.uint8, generator=g)
    return codes, gwint.pack_codes(codes, bits), scales, zeros


def _rel(out, ref):
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


# ---------------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    P = 32 // bits
    for N, K in ((3, 1), (5, P * 3), (7, P * 4 + 1), (2, 97)):
        codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8)
        qw = gwint.pack_codes(codes, bits)
        assert qw.dtype == torch.int32 and qw.shape == (math.ceil(K / P), N)
        assert torch.equal(gwint.unpack_codes(qw, bits, K), codes)
        words = qw.to(torch.int64) & 0xFFFFFFFF
        assert int((words >> (P * bits)).max()) == 0  # unused high bits are zero
        tail = K - (qw.shape[0] - 1) * P  # codes in the last word; padding slots above them are zero
        assert int((words[-1] >> (tail * bits)).max()) == 0
        # bit order: code of W[n, k] at bits [b*(k%P), b*(k%P)+b) of word k//P
        n, k = N - 1, K - 1
        assert (int(words[k // P, n]) >> (bits * (k % P))) & ((1 << bits) - 1) == int(codes[n, k])


@pytest.mark.parametrize("sym", [True, False])
def test_tensor_specs_and_dequantize(sym):
    N, K, bits, gs = 5, 70, 4, 32
    codes, qw, scales, zeros = _make(N, K, bits, gs, sym, torch.float16, seed=1)
    specs = gwint.tensor_specs(N, K, bits, gs, sym, torch.float16)
    got = {"qweight": qw, "scales": scales} | ({} if sym else {"zeros": zeros})
    assert set(specs) == set(got)
    for name, (shape, dt) in specs.items():
        assert tuple(got[name].shape) == shape and got[name].dtype == dt
    w = gwint.dequantize(qw, scales, zeros, bits, gs, K, dtype=torch.float32)
    for n, k in ((0, 0), (4, 69), (2, 33)):
        z = 8 if sym else int(zeros[k // gs, n])
        assert w[n, k].item() == (int(codes[n, k]) - z) * scales[k // gs, n].float().item()


# ---------------------------------------------------------------------------------------------------- kernels

# (M, N, K, bits, group_size, sym, dtype, regime, config, expected scale mode). Awkward on purpose: odd N,
# K = 576 with g = 128 (partial last group), group_size == K, non-power-of-two codes per word (3 bits), K tiles
# that straddle groups (modes 1 and 2), more splits than there are K tiles, bias on some.
GEMV = dict(block_n=32, block_kw=8, split_k=1)
CASES = [
    (1, 67, 576, 4, 128, True, torch.float16, "gemv", GEMV | dict(split_k=3), 0),
    (1, 67, 576, 4, 128, False, torch.bfloat16, "gemv", GEMV | dict(block_kw=4), 0),
    (1, 67, 576, 8, 576, True, torch.float16, "gemv", GEMV | dict(block_kw=16, split_k=2), 0),
    (1, 64, 512, 4, 128, False, torch.float16, "gemv", GEMV | dict(split_k=2), 0),  # full tiles: no masks
    (1, 45, 256, 8, 128, False, torch.bfloat16, "gemv", GEMV | dict(split_k=64), 0),
    (1, 33, 256, 4, 32, False, torch.float16, "gemv", GEMV | dict(split_k=2), 1),
    (1, 33, 200, 3, 64, True, torch.bfloat16, "gemv", GEMV | dict(block_kw=4, split_k=2), 2),
    (1, 33, 160, 2, 160, False, torch.float16, "gemv", GEMV | dict(block_kw=2, split_k=2), 0),
    (5, 67, 576, 4, 128, True, torch.float16, "gemm", dict(block_m=16, block_n=32, block_kw=8, split_k=3,
                                                          scale_after=True), 0),
    (5, 67, 576, 4, 128, False, torch.bfloat16, "gemm", dict(block_m=16, block_n=32, block_kw=8, split_k=3,
                                                            scale_after=True), 0),
    (16, 67, 576, 8, 576, True, torch.bfloat16, "gemm", dict(block_m=16, block_n=32, block_kw=8, split_k=1), 0),
    (33, 67, 576, 8, 128, False, torch.float16, "gemm", dict(block_m=16, block_n=32, block_kw=8, split_k=2), 0),
    (33, 67, 576, 8, 576, False, torch.float16, "gemm", dict(block_m=32, block_n=64, block_kw=16, split_k=1,
                                                            group_m=2), 0),
    (5, 67, 576, 4, 128, True, torch.float16, "gemm", dict(block_m=16, block_n=32, block_kw=16, split_k=2,
                                                          scale_after=True, sliced=True), 0),
    (20, 35, 512, 8, 512, False, torch.bfloat16, "gemm", dict(block_m=16, block_n=32, block_kw=16, split_k=1,
                                                             sliced=True), 0),
    (7, 33, 256, 4, 32, True, torch.float16, "gemm", dict(block_m=16, block_n=32, block_kw=8, split_k=2), 1),
    (17, 33, 200, 3, 64, False, torch.bfloat16, "gemm", dict(block_m=16, block_n=32, block_kw=2, split_k=2), 2),
    (7, 33, 200, 4, 64, False, torch.float16, "dequant", None, None),
    (9, 33, 200, 8, 200, True, torch.bfloat16, "dequant", None, None),
]


def _ids(c):
    M, N, K, bits, gs, sym, dt, regime = c[:8]
    return f"{regime}-M{M}-N{N}-K{K}-b{bits}-g{gs}-{'sym' if sym else 'asym'}-{str(dt)[6:]}"


def _launch(regime, x, qw, scales, zeros, bias, bits, gs, K, cfg):
    M, N = x.shape[0], qw.shape[1]
    if regime == "dequant":
        return gt.linear(x, qw, scales, zeros, bits, gs, K, bias=bias, regime="dequant")
    out = torch.full((M, N), float("nan"), dtype=x.dtype, device=x.device)  # poison: every element must be written
    launch = gt.launch_gemv if regime == "gemv" else gt.launch_gemm
    launch(x, qw, scales, zeros, bias, out, bits, gs, K, cfg)
    return out


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_matches_reference(case):
    M, N, K, bits, gs, sym, dtype, regime, cfg, mode = case
    if cfg is not None:  # the case exercises the scale mode it claims to
        assert gt._scale_mode(gwint.num_groups(K, gs), gs, 32 // bits, cfg["block_kw"]) == mode
    _, qw, scales, zeros = _make(N, K, bits, gs, sym, dtype, seed=M * 1000 + N + K + bits)
    x = torch.randn(M, K).to(dtype)
    bias = torch.randn(N).to(dtype) if (M + bits) % 2 else None
    ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K,
                                 None if bias is None else bias.float())
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    args = [dev(t) for t in (x, qw, scales, zeros, bias)]
    out = _launch(regime, *args, bits, gs, K, cfg)
    assert out.dtype == dtype and out.shape == (M, N)
    err = _rel(out.cpu(), ref)
    assert err < TOL[dtype], f"relative error {err:.2e}"
    if cfg is not None and cfg.get("split_k", 1) > 1:
        # split-K leaves its workspace zeroed, so a second call on fresh inputs is right too
        for ws, cnt in gt._WORKSPACES.values():
            assert not ws.any() and not cnt.any()
        x2 = torch.randn(M, K).to(dtype)
        ref2 = gwint.linear_reference(x2.float(), qw, scales, zeros, bits, gs, K,
                                      None if bias is None else bias.float())
        out2 = _launch(regime, dev(x2), *args[1:], bits, gs, K, cfg)
        assert _rel(out2.cpu(), ref2) < TOL[dtype]


def test_default_configs_are_valid():
    """The heuristic default (what runs without tuning: CPU, capture) for each regime, through `gwint.linear`."""
    torch.manual_seed(3)
    for M, N, K, bits, gs, dtype in ((1, 40, 300, 4, 64, torch.float16), (3, 40, 256, 8, 256, torch.bfloat16),
                                     (70, 24, 96, 4, 32, torch.float16)):
        _, qw, scales, zeros = _make(N, K, bits, gs, False, dtype, seed=M)
        x = torch.randn(2, M, K).to(dtype)[1]  # not at offset 0 of its storage
        ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K)
        os.environ["BITSMITH_TRITON"] = "1"
        try:
            assert gwint.use_triton(x)
            out = gwint.linear(x.to(DEVICE), *(t.to(DEVICE) for t in (qw, scales, zeros)), bits, gs, K)
        finally:
            del os.environ["BITSMITH_TRITON"]
        assert _rel(out.cpu(), ref) < TOL[dtype]


def test_linear_dispatch_and_batch_dims():
    N, K, bits, gs = 24, 64, 4, 32
    _, qw, scales, _ = _make(N, K, bits, gs, True, torch.float16, seed=7)
    x = torch.randn(2, 3, K).to(torch.float16)
    assert not gwint.use_triton(x) or ON_GPU  # CPU without the override: the reference
    if not ON_GPU:
        assert torch.equal(gwint.linear(x, qw, scales, None, bits, gs, K),
                           gwint.linear_reference(x, qw, scales, None, bits, gs, K))
    assert not gwint.use_triton(x.float())  # fp32 activations always take the reference
    out = gt.linear(x.to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), None, bits, gs, K)
    assert out.shape == (2, 3, N)
    assert _rel(out.cpu(), gwint.linear_reference(x.float(), qw, scales, None, bits, gs, K)) < TOL[torch.float16]


# ---------------------------------------------------------------------------------------------------- swapped kernel

def _sw(**kw):
    return dict(kernel="swapped", block_m=16, block_n=32, block_kw=16, split_k=1) | kw


# (M, N, K, bits, group_size, sym, dtype, bias, config): M = 1 and M past one tile, odd N, partial last group
# (K = 576, g = 128), K not a multiple of the words per tile, splits with a short last one, bits 2/3/8,
# per-channel groups, grouped tile order over several M tiles.
SWAPPED = [
    (1, 67, 576, 4, 128, True, torch.float16, False, _sw(split_k=3)),
    (1, 67, 576, 4, 128, False, torch.bfloat16, True, _sw(split_k=2, num_warps=2)),
    (5, 67, 576, 4, 128, False, torch.float16, True, _sw(split_k=2)),
    (16, 35, 384, 8, 128, True, torch.bfloat16, False, _sw(block_kw=32)),
    (33, 35, 512, 8, 512, False, torch.float16, True, _sw(block_m=64, block_n=64, block_kw=32, split_k=3)),
    (20, 33, 200, 3, 200, True, torch.bfloat16, False, _sw(block_m=32)),
    (7, 33, 512, 2, 256, False, torch.float16, False, _sw(split_k=2)),
    (40, 45, 256, 4, 128, True, torch.float16, False, _sw(group_m=2, split_k=2)),
    # the packed fp16x2 A operand (fp16, 4/8-bit; its Triton twin here, the inline PTX on the GPU's --check):
    # M = 1, 2, 16, 33, 128, odd N, partial last group, asymmetric zeros, bias, splits with a short last one
    (1, 67, 576, 4, 128, True, torch.float16, False, _sw(split_k=3, packed=True)),
    (2, 67, 576, 4, 128, False, torch.float16, True, _sw(split_k=2, packed=True)),
    (16, 35, 384, 8, 128, False, torch.float16, True, _sw(block_kw=32, split_k=2, packed=True)),
    (33, 35, 512, 8, 512, True, torch.float16, False, _sw(block_m=64, block_n=64, block_kw=32, split_k=3,
                                                          packed=True)),
    (128, 35, 256, 4, 128, False, torch.float16, True, _sw(block_m=128, block_n=64, packed=True)),
    (16, 33, 512, 4, 512, True, torch.float16, True, _sw(split_k=2, packed=True)),
    # group index by shift: 2 tiles per group (8-bit, 16-word tiles, g128), and by division (3 tiles per group)
    (16, 35, 640, 8, 128, False, torch.float16, False, _sw(split_k=2, packed=True)),
    (3, 35, 1000, 4, 384, True, torch.float16, True, _sw(split_k=2)),
    # 32-word 4-bit tiles over two g128 groups (scales and zeros per word column), partial last group (K = 576)
    (16, 67, 576, 4, 128, False, torch.float16, True, _sw(block_kw=32, split_k=2, packed=True)),
    (128, 35, 576, 4, 128, True, torch.float16, False, _sw(block_m=128, block_n=64, block_kw=32, packed=True)),
    (5, 67, 576, 4, 128, False, torch.float16, False, _sw(block_kw=32)),
    (33, 35, 512, 4, 128, False, torch.bfloat16, True, _sw(block_m=64, block_kw=32, split_k=2)),
    (7, 33, 320, 4, 64, False, torch.float16, True, _sw(split_k=2, packed=True)),  # g64: two groups per 16 words
    (128, 35, 512, 8, 128, True, torch.float16, False, _sw(block_m=128, block_kw=32, num_stages=2, maxnreg=128,
                                                           split_k=2, packed=True)),  # register cap (M = 128)
]


@pytest.mark.parametrize("case", SWAPPED, ids=lambda c: _ids(c[:7] + ("swapped",)))
def test_swapped_kernel_matches_reference(case):
    M, N, K, bits, gs, sym, dtype, use_bias, cfg = case
    assert gt.swapped_ok(bits, gs, K, cfg["block_kw"])
    _, qw, scales, zeros = _make(N, K, bits, gs, sym, dtype, seed=M * 7 + N + K + bits)
    bias = torch.randn(N).to(dtype) if use_bias else None
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    for rep in range(2 if cfg["split_k"] > 1 else 1):  # split-K leaves its workspace zeroed for the next call
        x = torch.randn(M, K).to(dtype)
        ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K, None if bias is None else bias.float())
        out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
        gt.launch_gemm_t(dev(x), dev(qw), dev(scales), dev(zeros), dev(bias), out, bits, gs, K, cfg)
        err = _rel(out.cpu(), ref)
        assert err < TOL[dtype], f"relative error {err:.2e} (call {rep})"
        for ws, cnt in gt._WORKSPACES.values():
            assert not ws.any() and not cnt.any()


def test_packed_swapped_applicability():
    assert gt.packed_t_ok(4, torch.float16) and gt.packed_t_ok(8, torch.float16)
    assert not gt.packed_t_ok(4, torch.bfloat16) and not gt.packed_t_ok(3, torch.float16)
    cfgs = gt.gemm_t_configs(16, 4096, 4096, 4, 128, 132, torch.float16)
    assert cfgs[0].get("packed") and not cfgs[-1].get("packed")  # the fp16 default stays as the last candidate
    assert not any(c.get("packed") for c in gt.gemm_t_configs(16, 4096, 4096, 4, 128, 132, torch.bfloat16))
    _, qw, scales, _ = _make(16, 256, 4, 128, True, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="packed swapped kernel takes fp16"):
        gt.launch_gemm_t(torch.randn(2, 256).bfloat16(), qw, scales, None, None, torch.empty(2, 16).bfloat16(), 4,
                         128, 256, _sw(packed=True))


def test_two_groups_per_tile():
    assert gt.swapped_ok(4, 128, 4096, 32) and gt._groups_per_tile(32, 128, 256) == 2
    assert not gt.swapped_ok(4, 64, 4096, 32)  # four groups per tile: no
    assert gt._groups_per_tile(1, 4096, 256) == 1 and gt._groups_per_tile(32, 128, 128) == 1
    assert all(c["block_kw"] == 16 for c in gt.gemm_t_configs(16, 4096, 4096, 4, 128, 132, torch.float16))
    fp16 = gt.gemm_t_configs(16, 4096, 4096, 4, 128, 132, torch.float16, two_groups=True)
    assert any(c["block_kw"] == 32 and c.get("packed") for c in fp16)
    assert all(c["block_kw"] == 16 for c in gt.gemm_t_configs(16, 4096, 4096, 4, 128, 132, torch.bfloat16,
                                                                 two_groups=True))


def test_swapped_configs_fit_shared_memory():
    assert gt._swapped_stages(128, 128, 32, 8, 3) == 2  # 80 KiB per stage (the H100 refused 3 stages)
    assert gt._swapped_stages(16, 128, 16, 8, 3) == 3
    for M in (1, 16, 33, 128):
        for bits, gs in ((4, 128), (8, 128), (8, 4096)):
            for c in gt.gemm_t_configs(M, 8192, 4096, bits, gs, 132, two_groups=True):
                P = 32 // bits
                per_stage = c["block_n"] * c["block_kw"] * 4 + c["block_m"] * c["block_kw"] * P * 2
                assert c["num_stages"] >= 2 and c["num_stages"] * per_stage <= gt.SMEM_BYTES - 4096


def test_tuner_skips_candidates_out_of_resources(monkeypatch):
    """A candidate that cannot launch (shared memory) is logged and skipped, not fatal."""
    monkeypatch.setattr(gt.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gt.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gt, "_interpreting", lambda: False)
    monkeypatch.setattr(gt, "time_cold_us", lambda fn: 1.0)

    def launch(c):
        if c["big"]:
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")
        return None

    key = ("test-oor",)
    gt._TUNED.pop(key, None)
    try:
        assert gt._tune(key, [dict(big=True), dict(big=False)], launch) == dict(big=False)
        assert any(e.get("key") == key and "error" in e for e in gt.TUNE_LOG)
        gt._TUNED.pop(key, None)
        with pytest.raises(RuntimeError, match="no tuning candidate"):
            gt._tune(key, [dict(big=True), dict(big=True, x=1)], launch)
    finally:
        gt._TUNED.pop(key, None)


def test_tpg_shift():
    assert gt._tpg_shift(1, 4096, 128) == 30  # one group
    assert gt._tpg_shift(5, 128, 128) == 0 and gt._tpg_shift(10, 128, 64) == 1
    assert gt._tpg_shift(3, 384, 128) == -1  # 3 tiles per group: the kernel divides


def test_pkt_asm_strings():
    """The PTX of the packed A pairs: byte selectors and masks per slot (the twin `_pkt_ref` mirrors them)."""
    a = gt._pkt_asm(4, 2)
    assert "prmt.b32 t, $2, $3, 0x501;" in a and "0x000F000F" in a and "0x00F000F0" in a and "$1" in a
    a = gt._pkt_asm(8, 3)
    assert "prmt.b32 t, $1, $2, 0x703;" in a and "0x00FF00FF" in a and "$1, $2" in a


def test_xperm_layout():
    """Activation permutation: slot j of K tile t is the contiguous run t * BK + j * BKW + [0, BKW)."""
    M, K, P, bkw = 3, 200, 10, 16
    x = torch.randn(M, K).to(torch.float16)
    k_tiles = -(-(-(-K // P)) // bkw)
    xp = torch.full((M, k_tiles * bkw * P), float("nan"), dtype=torch.float16, device=DEVICE)
    gt._xperm_kernel[(k_tiles, 2)](x.to(DEVICE), xp, M, K, x.stride(0), xp.stride(0),
                                    P=P, P2=16, BLOCK_KW=bkw, BLOCK_R=2)
    want = torch.zeros(M, k_tiles * bkw * P, dtype=torch.float16)
    for t in range(k_tiles):
        for j in range(P):
            for i in range(bkw):
                k = (t * bkw + i) * P + j
                if k < K:
                    want[:, t * bkw * P + j * bkw + i] = x[:, k]
    assert torch.equal(xp.cpu(), want)
    # ODD16 (packed 4-bit A operand): odd slots divided by 16, exactly
    P, k_tiles = 8, -(-(-(-K // 8)) // bkw)
    xp = torch.full((M, k_tiles * bkw * P), float("nan"), dtype=torch.float16, device=DEVICE)
    gt._xperm_kernel[(k_tiles, 2)](x.to(DEVICE), xp, M, K, x.stride(0), xp.stride(0),
                                    P=P, P2=8, BLOCK_KW=bkw, BLOCK_R=2, ODD16=True)
    for t in range(k_tiles):
        for j in range(P):
            for i in range(bkw):
                k = (t * bkw + i) * P + j
                got = xp[:, t * bkw * P + j * bkw + i].cpu()
                assert torch.equal(got, x[:, k] / (16 if j % 2 else 1) if k < K else torch.zeros_like(got))


def test_swapped_applicability():
    assert gt.swapped_ok(4, 128, 4096, 16) and not gt.swapped_ok(4, 128, 4096, 8)  # a dot needs K >= 16
    assert not gt.swapped_ok(4, 32, 4096, 16)  # a 128-code tile would straddle four 32-code groups
    assert gt.swapped_ok(4, 64, 4096, 16)  # ... but two 64-code groups are fine (scales per word column)
    assert gt.swapped_ok(4, 64, 64, 16)  # one group (g == K): any tile
    assert gt.gemm_t_configs(16, 4096, 4096, 4, 32, 132) == []
    cfgs = gt.gemm_t_configs(16, 4096, 4096, 8, 128, 132)
    assert cfgs and all(c["kernel"] == "swapped" and gt.swapped_ok(8, 128, 4096, c["block_kw"]) for c in cfgs)
    _, qw, scales, _ = _make(16, 256, 4, 32, True, torch.float16, seed=1)
    out = torch.empty(2, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="swapped kernel cannot take"):
        gt.launch_gemm_t(torch.randn(2, 256).half(), qw, scales, None, None, out, 4, 32, 256, _sw())


def test_swapped_through_linear_dispatch():
    """A pinned swapped config runs through `linear` in both regimes, on rows with a stride wider than K."""
    N, K, bits, gs = 40, 256, 4, 128
    _, qw, scales, zeros = _make(N, K, bits, gs, False, torch.float16, seed=11)
    wide = torch.randn(6, K + 8).to(torch.float16)
    for M, regime in ((1, "gemv"), (6, "gemm")):
        x = wide[:M, :K]  # row stride K + 8
        ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K)
        out = gt.linear(x.to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), bits, gs, K,
                        config=_sw(split_k=2), regime=regime)
        assert out.shape == (M, N) and _rel(out.cpu(), ref) < TOL[torch.float16]
    with pytest.raises(ValueError, match="unknown regime"):
        gt.linear(x.to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), bits, gs, K, regime="gemm_t")


# ---------------------------------------------------------------------------------------------------- wide GEMV

def _wide(**kw):
    return dict(kernel="wide", block_n=32, block_kw=4, split_k=1, num_warps=1) | kw


# (N, K, bits, group_size, sym, dtype, bias, config): odd N (masked columns), K = 576 with g = 128 (partial last
# group), K not a multiple of the codes per word (3 bits: a partial last word) or of the tile, splits with a short
# last one and more splits than tiles, bits 2/3/4/8, per-channel groups, full tiles (no masks at all).
WIDE = [
    (67, 576, 4, 128, True, torch.float16, False, _wide(split_k=3)),
    (67, 576, 4, 128, False, torch.bfloat16, True, _wide(split_k=2, block_kw=8)),
    (64, 512, 4, 128, True, torch.float16, True, _wide(split_k=2)),  # EVEN: unmasked loads
    (64, 512, 4, 128, False, torch.float16, False, _wide(split_k=1, block_n=64)),  # EVEN, one split, 4 tiles
    (45, 256, 8, 128, False, torch.bfloat16, False, _wide(split_k=64)),
    (33, 1000, 8, 1000, True, torch.float16, True, _wide(block_kw=16, split_k=5)),
    (35, 300, 3, 300, False, torch.float16, False, _wide(split_k=2)),  # partial last word, per channel
    (33, 512, 2, 256, True, torch.bfloat16, True, _wide(block_kw=2, split_k=3)),
    (40, 300, 4, 64, False, torch.float16, False, _wide(block_kw=8, split_k=2)),  # g64 = 8 words, K past a tile
    # unrolled splits of exactly `unroll` tiles: 18 tiles in 3 splits of 8 (the last one 2 real tiles), one split
    # of 4 tiles with 3 masked, EVEN (64 x 512, 4-bit: 16 tiles = 4 x 4), bf16 asymmetric with bias, 8-bit per channel
    (67, 576, 4, 128, True, torch.float16, True, _wide(unroll=8)),
    (33, 80, 4, 80, True, torch.float16, False, _wide(unroll=4)),
    (64, 512, 4, 128, True, torch.float16, False, _wide(unroll=4, block_n=64)),
    (67, 576, 4, 128, False, torch.bfloat16, True, _wide(unroll=2, block_kw=8)),
    (35, 1000, 8, 1000, False, torch.float16, True, _wide(unroll=16)),
    (35, 200, 3, 200, True, torch.float16, False, _wide(unroll=2, block_kw=8)),
    # the packed fp16x2 path (fp16, 4/8-bit; its Triton fallback here, the inline PTX on the GPU's --check)
    (67, 576, 4, 128, True, torch.float16, True, _wide(unroll=4, packed=True)),
    (67, 576, 4, 128, False, torch.float16, False, _wide(unroll=2, packed=True)),
    (64, 512, 4, 128, True, torch.float16, False, _wide(unroll=4, block_n=64, packed=True)),  # EVEN
    (33, 80, 4, 80, False, torch.float16, True, _wide(unroll=4, packed=True)),  # 3 masked tiles, odd last row
    (35, 1000, 8, 1000, False, torch.float16, True, _wide(unroll=8, packed=True)),
    (45, 256, 8, 128, True, torch.float16, False, _wide(unroll=2, block_kw=8, packed=True)),
]


@pytest.mark.parametrize("case", WIDE, ids=lambda c: _ids((1,) + c[:6] + ("wide",)))
def test_wide_gemv_matches_reference(case):
    N, K, bits, gs, sym, dtype, use_bias, cfg = case
    assert gt.wide_ok(bits, gs, K, cfg["block_kw"])
    _, qw, scales, zeros = _make(N, K, bits, gs, sym, dtype, seed=N + K + bits)
    bias = torch.randn(N).to(dtype) if use_bias else None
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    for rep in range(2 if cfg["split_k"] > 1 or cfg.get("unroll") else 1):  # split-K leaves its workspace zeroed
        x = torch.randn(1, K).to(dtype)
        ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K, None if bias is None else bias.float())
        out = torch.full((1, N), float("nan"), dtype=dtype, device=DEVICE)
        gt.launch_gemv_wide(dev(x), dev(qw), dev(scales), dev(zeros), dev(bias), out, bits, gs, K, cfg)
        err = _rel(out.cpu(), ref)
        assert err < TOL[dtype], f"relative error {err:.2e} (call {rep})"
        for ws, cnt in gt._WORKSPACES.values():
            assert not ws.any() and not cnt.any()


def test_wide_gemv_applicability_and_configs():
    assert gt.wide_ok(4, 128, 4096, 16) and not gt.wide_ok(4, 128, 4096, 32)  # a 256-code tile spans 2 groups
    assert not gt.wide_ok(3, 64, 4096, 2)  # 10 codes per word: words straddle 64-code groups
    assert gt.gemv_wide_configs(4096, 4096, 3, 64, 132) == []
    for bits, gs in ((4, 128), (8, 128), (8, 4096), (2, 64)):
        cfgs = gt.gemv_wide_configs(4096, 4096, bits, gs, 132)
        assert cfgs and all(c["kernel"] == "wide" and gt.wide_ok(bits, gs, 4096, c["block_kw"]) for c in cfgs)
        assert all(c["block_n"] // (32 * c["num_warps"]) in (4, 8) for c in cfgs)
    _, qw, scales, _ = _make(16, 256, 4, 64, True, torch.float16, seed=1)
    with pytest.raises(ValueError, match="wide GEMV cannot take"):
        gt.launch_gemv_wide(torch.randn(1, 256).half(), qw, scales, None, None, torch.empty(1, 16).half(), 4, 64,
                            256, _wide(block_kw=16))
    with pytest.raises(ValueError, match="exactly one row"):
        gt.linear(torch.randn(2, 256).half().to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), None, 4, 64, 256,
                  config=_wide(), regime="gemm")


def test_packed_applicability():
    assert gt.packed_ok(4, torch.float16, 4, 2) and gt.packed_ok(8, torch.float16, 8, 16)
    assert not gt.packed_ok(4, torch.bfloat16, 4, 2) and not gt.packed_ok(3, torch.float16, 4, 2)
    assert not gt.packed_ok(4, torch.float16, 1, 2) and not gt.packed_ok(4, torch.float16, 4, 0)
    _, qw, scales, _ = _make(16, 256, 4, 128, True, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="packed wide GEMV takes fp16"):
        gt.launch_gemv_wide(torch.randn(1, 256).bfloat16(), qw, scales, None, None, torch.empty(1, 16).bfloat16(), 4,
                            128, 256, _wide(unroll=2, packed=True))
    cfgs = gt.gemv_wide_configs(4096, 4096, 4, 128, 132, torch.float16)
    assert any(c.get("packed") for c in cfgs)
    assert not any(c.get("packed") for c in gt.gemv_wide_configs(4096, 4096, 4, 128, 132, torch.bfloat16))


def test_wide_gemv_through_linear_dispatch():
    """The wide GEMV is the M == 1 default where it fits; a pinned wide config runs through `linear`."""
    N, K, bits, gs = 40, 256, 4, 128
    assert gt.gemv_wide_configs(N, K, bits, gs, 132)[0]["kernel"] == "wide"
    _, qw, scales, zeros = _make(N, K, bits, gs, False, torch.float16, seed=12)
    x = torch.randn(3, K + 8).to(torch.float16)[1:2, :K]  # a strided row, not at offset 0
    ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K)
    for cfg in (None, _wide(split_k=2)):
        out = gt.linear(x.to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE), bits, gs, K, config=cfg)
        assert out.shape == (1, N) and _rel(out.cpu(), ref) < TOL[torch.float16]


# ---------------------------------------------------------------------------------------------------- deep GEMV

def _deep(**kw):
    return dict(kernel="deep", block_n=32, rows=16, unroll=1, num_warps=4) | kw


# (N, K, bits, group_size, sym, bias, config), fp16 only: odd N (masked columns), K = 576 with g128 (partial last
# group) in 3 splits with a short last one, EVEN tiles with one split and with two, g64 / g32 / g16 (a group of
# 8 / 4 / 2 word rows: the scales gathered per row pair), 8-bit per channel with K not a multiple of the chunk.
DEEP = [
    (67, 576, 4, 128, True, True, _deep(unroll=2)),
    (67, 576, 4, 128, False, False, _deep(rows=8, unroll=5, block_n=16)),
    (64, 512, 4, 128, True, False, _deep(rows=64)),  # EVEN, one split: the plain store
    (64, 512, 4, 64, False, True, _deep(rows=16, unroll=2, block_n=16)),  # EVEN, two splits
    (35, 1000, 8, 1000, False, True, _deep(rows=32, unroll=4)),
    (45, 256, 8, 128, True, False, _deep(rows=8, unroll=2, block_n=64)),
    (33, 320, 4, 32, True, False, _deep(rows=8, unroll=3)),
    (20, 96, 4, 16, False, False, _deep(rows=4, unroll=2, block_n=16)),
]


@pytest.mark.parametrize("case", DEEP, ids=lambda c: _ids((1,) + c[:5] + (torch.float16, "deep")))
def test_deep_gemv_matches_reference(case):
    N, K, bits, gs, sym, use_bias, cfg = case
    assert gt.deep_ok(bits, torch.float16, gs, K)
    _, qw, scales, zeros = _make(N, K, bits, gs, sym, torch.float16, seed=N + K + bits + 7)
    bias = torch.randn(N).half() if use_bias else None
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    for rep in range(2):  # split-K leaves its workspace zeroed
        x = torch.randn(1, K).half()
        ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K, None if bias is None else bias.float())
        out = torch.full((1, N), float("nan"), dtype=torch.float16, device=DEVICE)
        gt.launch_gemv_deep(dev(x), dev(qw), dev(scales), dev(zeros), dev(bias), out, bits, gs, K, cfg)
        err = _rel(out.cpu(), ref)
        assert err < TOL[torch.float16], f"relative error {err:.2e} (call {rep})"
        for ws, cnt in gt._WORKSPACES.values():
            assert not ws.any() and not cnt.any()


def test_deep_gemv_applicability_and_configs():
    assert gt.deep_ok(4, torch.float16, 128, 4096) and gt.deep_ok(8, torch.float16, 4096, 4096)
    assert gt.deep_ok(4, torch.float16, 16, 4096) and not gt.deep_ok(4, torch.float16, 8, 4096)  # 8 < a row pair
    assert not gt.deep_ok(4, torch.bfloat16, 128, 4096) and not gt.deep_ok(3, torch.float16, 120, 4096)
    assert gt.gemv_deep_configs(4096, 4096, 4, 128, 132, torch.bfloat16) == []
    # the decode shapes: chunks tile K exactly (unmasked loads), one split at K = 4096 for the first candidate
    for N, K, bits, gs in ((6144, 4096, 4, 128), (4096, 4096, 4, 64), (28672, 4096, 4, 128), (4096, 14336, 4, 128),
                           (4096, 4096, 8, 4096)):
        KW = K // (32 // bits)
        cfgs = gt.gemv_deep_configs(N, K, bits, gs, 132)
        assert cfgs and all(c["kernel"] == "deep" for c in cfgs)
        for c in cfgs:
            span = c["rows"] * c["unroll"]
            assert KW % span == 0 and c["rows"] & (c["rows"] - 1) == 0
        if K == 4096 and bits == 4:
            assert cfgs[0]["rows"] * cfgs[0]["unroll"] == KW
    _, qw, scales, _ = _make(16, 256, 4, 128, True, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="deep GEMV takes fp16"):
        gt.launch_gemv_deep(torch.randn(1, 256).bfloat16(), qw, scales, None, None, torch.empty(1, 16).bfloat16(), 4,
                            128, 256, _deep())
    with pytest.raises(ValueError, match="power of two"):
        gt.launch_gemv_deep(torch.randn(1, 256).half(), qw, scales.half(), None, None, torch.empty(1, 16).half(), 4,
                            128, 256, _deep(rows=12))
    with pytest.raises(ValueError, match="exactly one row"):
        gt.linear(torch.randn(2, 256).half().to(DEVICE), qw.to(DEVICE), scales.half().to(DEVICE), None, 4, 128, 256,
                  config=_deep(), regime="gemm")


def test_deep_gemv_through_linear_dispatch():
    """A pinned deep config runs through `linear` (a strided row), and the deep candidates are in the M == 1 space."""
    N, K, bits, gs = 40, 256, 4, 64
    _, qw, scales, zeros = _make(N, K, bits, gs, True, torch.float16, seed=13)
    x = torch.randn(3, K + 8).to(torch.float16)[1:2, :K]
    ref = gwint.linear_reference(x.float(), qw, scales, zeros, bits, gs, K)
    out = gt.linear(x.to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), None, bits, gs, K, config=_deep(rows=8, unroll=2))
    assert out.shape == (1, N) and _rel(out.cpu(), ref) < TOL[torch.float16]


def test_tuner_times_rotated_weight_copies(monkeypatch):
    """With weight tensors the tuner launches each candidate on rotated copies of them (graph timing like the
    benchmark table) and keeps the fastest; without, the cold-L2 timing."""
    from bitsmith.kernels import bench, bsr

    monkeypatch.setattr(gt.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gt.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(gt, "_interpreting", lambda: False)
    w = {"qweight": torch.zeros(4, 8, dtype=torch.int32), "scales": torch.ones(1, 8)}
    copies = [w, {k: v.clone() for k, v in w.items()}, {k: v.clone() for k, v in w.items()}]
    monkeypatch.setattr(bsr, "_rotated_copies", lambda t: copies if t is w else None)
    seen = []

    def graph_time_us(calls, min_calls, replays):
        for c in calls:
            seen.append(c())
        return {"a": 2.0, "b": 1.0}[seen[-1][0]]

    monkeypatch.setattr(bench, "graph_time_us", graph_time_us)
    monkeypatch.setattr(gt, "time_cold_us", lambda fn: pytest.fail("cold timing used"))

    def launch(c, t=None):
        return (c["name"], None if t is None else id(t["qweight"]))

    key = ("test-rotated",)
    gt._TUNED.pop(key, None)
    try:
        assert gt._tune(key, [dict(name="a"), dict(name="b")], launch, w) == dict(name="b")
        assert {s[1] for s in seen} == {id(c["qweight"]) for c in copies}
        assert [e["timing"] for e in gt.TUNE_LOG if e.get("key") == key] == ["rotated", "rotated"]
    finally:
        gt._TUNED.pop(key, None)


def test_pdl_is_off_under_the_interpreter(monkeypatch):
    """`gwint_triton.PDL` adds the PDL constexpr and launch attribute on the GPU only (checked there by
    `bench kernels --check` with BITSMITH_PDL=1: chains of GEMVs in a CUDA graph); the interpreter runs as before."""
    monkeypatch.setattr(gt, "PDL", True)
    monkeypatch.setattr(gt, "_interpreting", lambda: False)
    assert gt._pdl_kwargs() == dict(PDL=True, launch_pdl=True)
    monkeypatch.setattr(gt, "_interpreting", lambda: True)
    assert gt._pdl_kwargs() == {}
    N, K, bits, gs = 40, 256, 4, 128
    _, qw, scales, _ = _make(N, K, bits, gs, True, torch.float16, seed=14)
    x = torch.randn(1, K).half()
    ref = gwint.linear_reference(x.float(), qw, scales, None, bits, gs, K)
    for cfg in (_deep(rows=8, unroll=2), _wide(unroll=2, packed=True)):
        out = gt.linear(x.to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), None, bits, gs, K, config=cfg)
        assert _rel(out.cpu(), ref) < TOL[torch.float16]


def test_two_group_tiles_offered_where_nothing_else_fits(monkeypatch):
    """4-bit g64: no one-group swapped tile exists (16 words = 128 codes), so `linear` offers the two-group ones."""
    assert gt.gemm_t_configs(16, 4096, 4096, 4, 64, 132, torch.float16) == []
    assert gt.gemm_t_configs(16, 4096, 4096, 4, 64, 132, torch.float16, two_groups=True)
    seen = []
    monkeypatch.setattr(gt, "_tune", lambda key, cands, go, tensors=None: seen.extend(cands) or cands[0])
    N, K, bits, gs = 33, 320, 4, 64
    _, qw, scales, _ = _make(N, K, bits, gs, True, torch.float16, seed=15)
    x = torch.randn(16, K).half()
    out = gt.linear(x.to(DEVICE), qw.to(DEVICE), scales.to(DEVICE), None, bits, gs, K)
    assert seen[0]["kernel"] == "swapped" and any(c.get("kernel") == "swapped" for c in seen)
    ref = gwint.linear_reference(x.float(), qw, scales, None, bits, gs, K)
    assert _rel(out.cpu(), ref) < TOL[torch.float16]
