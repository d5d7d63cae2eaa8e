"""kernels.launch: the launcher prologue, the grouped program order (a @triton.jit helper run under
TRITON_INTERPRET=1), and function_format."""

import pytest
import torch

from bitsmith.compress import formats
from bitsmith.kernels import launch
from tests.kernels.conftest import DEVICE, needs_kernels


def test_flat_rows_views_and_restores_the_leading_dims():
    x = torch.randn(2, 3, 8)
    r = launch.flat_rows(x, 8, 5)
    assert r.M == 6 and r.x2.shape == (6, 8) and r.out.shape == (6, 5) and r.out.dtype == x.dtype
    assert r.x2.data_ptr() == x.data_ptr()  # a view, no copy
    r.out.copy_(torch.arange(30.0).view(6, 5))
    assert torch.equal(r.result(), torch.arange(30.0).view(2, 3, 5))


def test_flat_rows_copies_a_strided_last_dim_and_handles_empty_and_wrong_inputs():
    x = torch.randn(8, 4).t()  # [4, 8], stride 4 along the features
    r = launch.flat_rows(x, 8, 3)
    assert r.x2.stride(-1) == 1 and torch.equal(r.x2, x)
    empty = launch.flat_rows(torch.randn(0, 7, dtype=torch.float16), 7, 2)
    assert empty.M == 0 and empty.result().shape == (0, 2) and empty.result().dtype == torch.float16
    with pytest.raises(ValueError, match="x has 6 features, the weight expects 8"):
        launch.flat_rows(torch.randn(4, 6), 8, 3)


@pytest.mark.parametrize("M,N,bm,bn,gm", [(64, 64, 16, 16, 2), (80, 48, 16, 16, 3), (16, 16, 16, 16, 8),
                                          (17, 100, 16, 32, 1)])
def test_grouped_pid_reference_covers_every_tile_once_in_bands(M, N, bm, bn, gm):
    num_m, num_n = -(-M // bm), -(-N // bn)
    tiles = [launch.grouped_pid_reference(p, M, N, bm, bn, gm) for p in range(num_m * num_n)]
    assert sorted(tiles) == [(i, j) for i in range(num_m) for j in range(num_n)]
    # within a full band, consecutive programs step down the tile rows first
    if num_m >= gm > 1:
        assert tiles[0] == (0, 0) and tiles[1] == (1, 0)


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _order_kernel(out_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = launch.grouped_pid(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@needs_kernels
@pytest.mark.parametrize("M,N,bm,bn,gm", [(80, 48, 16, 16, 3), (17, 100, 16, 32, 8)])
def test_grouped_pid_kernel_matches_the_reference(M, N, bm, bn, gm):
    n = -(-M // bm) * -(-N // bn)
    out = torch.full((n, 2), -1, dtype=torch.int32, device=DEVICE)
    _order_kernel[(n,)](out, M, N, BLOCK_M=bm, BLOCK_N=bn, GROUP_M=gm)
    expect = [launch.grouped_pid_reference(p, M, N, bm, bn, gm) for p in range(n)]
    assert out.cpu().tolist() == [list(t) for t in expect]


def test_function_format_registers_a_class_that_delegates():
    calls = []

    def specs(params, dtype):
        return {"w": ((params["out_features"], params["in_features"]), dtype)}

    def deq(tensors, params):
        return tensors["w"] * 2

    def lin(x, tensors, params, bias):
        calls.append(bias)
        return x @ deq(tensors, params).t()

    def check(params):
        return None if params.get("ok") else "not ok"

    name = "launch-test-format"
    try:
        cls = launch.function_format(name, 3, "A test format.", tensor_specs=specs, dequantize=deq, linear=lin,
                                     check_params=check, loadable_versions=(2, 3))
        fmt = formats.get_format(name)
        assert isinstance(fmt, cls) and cls.__doc__ == "A test format." and cls.version == 3
        assert cls.loadable_versions == (2, 3)
        p = {"in_features": 4, "out_features": 2}
        assert fmt.tensor_specs(p, torch.float16) == {"w": ((2, 4), torch.float16)}
        assert fmt.bits_per_weight(p, torch.float16) == 16.0
        w = torch.randn(2, 4)
        assert torch.equal(fmt.dequantize({"w": w}, p), w * 2)
        x = torch.randn(3, 4)
        assert torch.allclose(fmt.linear(x, {"w": w}, p, None), x @ (2 * w).t()) and calls == [None]
        assert fmt.check_params({"ok": True}) is None and fmt.check_params({}) == "not ok"
        plain = launch.function_format(name, 1, "", tensor_specs=specs, dequantize=deq, linear=lin)
        assert formats.get_format(name).check_params({}) is None and plain.name == name
    finally:
        formats._FORMATS.pop(name, None)
