"""CPU inference for the `bsr` format: gather the x segments of the stored blocks, one batched matmul, a segment sum.

    y[m, r R + i] = sum over stored blocks b of block row r:  sum_j values[b, i, j] * x[m, col[b] C + j]

`gather_linear` computes this as `bmm(values [B, R, C], x_gathered [B, C, M]) -> [B, R, M]`, then adds each
block's partial product into its block row (`index_add_`): only the stored blocks are read. It beats the dense
matmul when few blocks are stored and blocks are at least 16x16 (at M = 1 also at 50% with 32x32 and larger);
thin blocks (1x4, 4x1) gather too little per index and lose badly, but torch's CPU CSR matmul (MKL) wins for them
at 85%+ sparsity (`csr_linear`, the CSR matrix built once and cached per weight). Elsewhere the dense weight is
rebuilt and multiplied. All three are exact. `choose` encodes the crossovers measured on this project's 2-core CPU
(benchmarks/blocksparse_kernels.py --cpu, docs/results/blocksparse.md).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from . import bsr

MAX_GATHER_BYTES = 64 * 2**20  # chunk M so that the gathered x stays under this
_CSR_CACHE: dict[int, tuple] = {}  # id(values tensor) -> (weakref to it, its _version, CSR matrix)


def choose(params: dict, M: int) -> str:
    """'gather', 'csr' or 'dense' for an [M, K] input (rules from the measurements in docs/results/blocksparse.md)."""
    d = bsr.density(params)
    area = params["block_rows"] * params["block_cols"]
    if area >= 1024 and d <= 0.5 and M == 1:
        return "gather"
    if area >= 256 and d <= 0.35 and (M <= 16 or d <= 0.15):
        return "gather"
    if area < 256 and d <= 0.15:
        return "csr"
    return "dense"


def use_gather(params: dict, M: int = 1) -> bool:
    return choose(params, M) == "gather"


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


def csr_weight(tensors: dict, params: dict) -> torch.Tensor:
    """The weight as a float32 torch CSR matrix [N, K], built once per stored values tensor (cached)."""
    key = tensors.get("values", tensors.get("qvalues"))
    hit = _CSR_CACHE.get(id(key))
    if hit is not None and hit[0]() is key and hit[1] == key._version:
        return hit[2]
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        w = bsr.dequantize(tensors, params, torch.float32).to_sparse_csr()
    ident = id(key)
    _CSR_CACHE[ident] = (weakref.ref(key, lambda _, ident=ident: _CSR_CACHE.pop(ident, None)), key._version, w)
    return w


def csr_linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) by torch's CPU sparse CSR matmul (float32 inside)."""
    K, N = params["in_features"], params["out_features"]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K).to(torch.float32)
    y = torch.mm(csr_weight(tensors, params), x2.t()).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, N)


def linear(x: torch.Tensor, tensors: dict, params: dict, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The CPU op: gather + bmm, torch CSR, or the dense reference, whichever `choose` picks for this M."""
    how = choose(params, x.numel() // max(1, params["in_features"]))
    if how == "gather":
        return gather_linear(x, tensors, params, bias)
    if how == "csr":
        return csr_linear(x, tensors, params, bias)
    return bsr.linear_reference(x, tensors, params, bias)
