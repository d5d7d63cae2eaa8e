"""CPU inference for the `bsr` format: gather the x segments of the stored blocks, one batched matmul, a segment sum.

    y[m, r R + i] = sum over stored blocks b of block row r:  sum_j values[b, i, j] * x[m, col[b] C + j]

`linear` computes this as `bmm(values [B, R, C], x_gathered [B, C, M]) -> [B, R, M]`, then adds each block's
partial product into its block row (`index_add_`): the weights are read once, only the stored blocks. It beats the
dense matmul when few blocks are stored and the blocks are not thin; elsewhere (`use_gather` false) the dense
weight is rebuilt and multiplied (exact either way). The crossover was measured on this project's 2-core CPU
(benchmarks/blocksparse_kernels.py --cpu, docs/results/blocksparse.md).
"""

from __future__ import annotations

import torch

from . import bsr

# Gather path when the stored fraction of blocks is at most this and a block holds at least MIN_BLOCK weights.
MAX_DENSITY = 0.5
MIN_BLOCK = 64
MAX_GATHER_BYTES = 64 * 2**20  # chunk M so that the gathered x stays under this


def use_gather(params: dict) -> bool:
    return (bsr.density(params) <= MAX_DENSITY
            and params["block_rows"] * params["block_cols"] >= MIN_BLOCK)


def _row_of_block(crow: torch.Tensor) -> torch.Tensor:
    crow = crow.to(torch.int64)
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), crow[1:] - crow[:-1])


def gather_linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) by gather + bmm + segment sum, in x's dtype."""
    N, K, R, C = params["out_features"], params["in_features"], params["block_rows"], params["block_cols"]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    vals = bsr.block_values(tensors, params, x.dtype)  # [B, R, C]
    B = vals.shape[0]
    col = tensors["col_indices"].to(torch.int64)
    rows = _row_of_block(tensors["crow_indices"])
    out = torch.zeros(N // R, R, M, dtype=x.dtype, device=x.device)
    if B:
        xt = x2.t().reshape(K // C, C, M)  # [KB, C, M]
        step = max(1, MAX_GATHER_BYTES // max(1, B * C * x.element_size()))
        for m0 in range(0, M, step):
            xs = xt[:, :, m0:m0 + step]
            part = torch.bmm(vals, xs[col])  # [B, R, m]
            out[:, :, m0:m0 + step].index_add_(0, rows, part)
    y = out.reshape(N, M).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, N)


def linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU op: the gather path where it wins (`use_gather`), else the dense reference."""
    if use_gather(params):
        return gather_linear(x, tensors, params, bias)
    return bsr.linear_reference(x, tensors, params, bias)
