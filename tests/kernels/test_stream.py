"""bitsmith.kernels.stream: the read-only stream kernel (a bandwidth ceiling) under TRITON_INTERPRET=1 against the
torch xor reference, on sizes that are not a multiple of a program's words (masked tail) and on one that is."""

import pytest
import torch

from tests.kernels.conftest import DEVICE, needs_kernels

pytest.importorskip("triton")
from bitsmith.kernels import stream  # noqa: E402


@needs_kernels
@pytest.mark.parametrize("n,block,steps,warps", [(1, 64, 2, 1), (1000, 64, 4, 2), (4096, 128, 4, 4),
                                                 (777, 256, 1, 4)])
def test_read_words_matches_xor(n, block, steps, warps):
    x = torch.randint(-2**31, 2**31 - 1, (n,), dtype=torch.int32)
    got = stream.read_words(x.to(DEVICE), block, steps, warps)
    assert got.shape == (-(-n // (block * steps)),)
    assert torch.equal(got.cpu(), stream.xor_reference(x, block * steps))


def test_read_words_rejects_other_dtypes():
    with pytest.raises(ValueError, match="int32"):
        stream.read_words(torch.zeros(8, dtype=torch.float32))


def test_xor_reference_small():
    x = torch.tensor([1, 2, 4, -1], dtype=torch.int32)
    assert stream.xor_reference(x, 2).tolist() == [3, 4 ^ -1]
    assert stream.xor_reference(x, 3).tolist() == [7, -1]


@needs_kernels
@pytest.mark.parametrize("rows,split,N,block_n", [(4, 1, 64, 64), (2, 3, 128, 64), (8, 5, 96, 32)])
def test_read_tiles_with_and_without_the_split_k_epilogue(rows, split, N, block_n):
    """Small codes (0..15): every xor and every fp16 sum of them is exact. Workspaces left zeroed."""
    from bitsmith.kernels import gwint_triton

    x = torch.randint(0, 16, (rows * split, N), dtype=torch.int32)
    blocks = x.view(split, rows, N)
    xor = blocks[:, 0].clone()
    for r in range(1, rows):
        xor ^= blocks[:, r]  # [split, N]
    got = stream.read_tiles(x.to(DEVICE), rows, block_n, epilogue=True)
    assert torch.equal(got.cpu().float(), xor.sum(0).float())
    words = stream.read_tiles(x.to(DEVICE), rows, block_n)
    want = torch.stack([stream.xor_reference(xor[k, n * block_n:(n + 1) * block_n].contiguous(), block_n)[0]
                        for k in range(split) for n in range(N // block_n)])
    assert torch.equal(words.cpu(), want)
    for ws, cnt in gwint_triton._WORKSPACES.values():
        assert not ws.any() and not cnt.any()
    with pytest.raises(ValueError):
        stream.read_tiles(torch.zeros(rows * split, block_n + 4, dtype=torch.int32), rows, block_n)
