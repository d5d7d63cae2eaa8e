"""A Linear with the decoder-layer ops around it fused in: `fused_linear(x, lin, norm=, residual=, glu=)`.

    y = [residual +] GLU?( RMSNorm?(x) @ W^T )

- norm = (weight [K], eps): Llama's RMSNorm of x first (fp32 statistics, fp16(x * rstd) * weight).
- glu: W's output rows are interleaved (gate_0, up_0, gate_1, up_1, ...) and y = SiLU(gate) * up, [..., N / 2].
- residual [..., N]: added to the result (the residual stream of a decoder layer).

For a gwint `PackedLinear` and one row of fp16 activations on the GPU this is one launch of the deep GEMV
(`gwint_triton.fused_gemv`: RMSNorm in its prologue, SiLU-multiply in its epilogue, the residual where the GEMV
adds a bias), through the opaque custom op `bitsmith::gwint_fused_linear` under `torch.compile`. Everywhere else
(nn.Linear, several rows, the CPU, bf16, formats the deep kernel does not take) the unfused ops run, written the
way Hugging Face's Llama writes them, so the compiler fuses what it can around cuBLAS or the packed op.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from . import gwint


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm (transformers' LlamaRMSNorm.forward)."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def glu(y: torch.Tensor) -> torch.Tensor:
    """[..., 2 n] of interleaved (gate, up) columns -> SiLU(gate) * up [..., n]."""
    g, u = y.unflatten(-1, (-1, 2)).unbind(-1)
    return F.silu(g) * u


def interleave_rows(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up [n, K] -> [2 n, K] with rows gate_0, up_0, gate_1, up_1, ... (the layout `glu` takes)."""
    return torch.stack([gate, up], dim=1).flatten(0, 1)


def compose(x, linear_fn, norm=None, residual=None, use_glu=False) -> torch.Tensor:
    """The unfused ops (the reference): linear_fn(x [..., K]) -> [..., N]."""
    if norm is not None:
        x = rms_norm(x, *norm)
    y = linear_fn(x)
    if use_glu:
        y = glu(y)
    if residual is not None:
        y = residual + y
    return y


def _gwint_packed(lin) -> bool:
    from .modules import PackedLinear

    return isinstance(lin, PackedLinear) and lin.format_name == "gwint" and lin.bias is None


def fused_linear(x: torch.Tensor, lin: torch.nn.Module, norm: tuple | None = None,
                 residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """See the module docstring. lin: an nn.Linear or a PackedLinear; norm: (weight, eps)."""
    if glu and residual is not None:
        raise ValueError("fused_linear: glu and residual together are not supported")
    if _gwint_packed(lin) and x.numel() == x.shape[-1] and gwint.use_triton(x):
        p = lin.params
        nw, eps = norm if norm is not None else (None, 0.0)
        args = (x, lin.qweight, lin.scales, getattr(lin, "zeros", None), p["bits"], p["group_size"],
                p["in_features"], nw, float(eps), residual, glu)
        if torch.compiler.is_compiling():
            return torch.ops.bitsmith.gwint_fused_linear(*args)
        return _gwint_fused(*args)
    return compose(x, lin, norm, residual, glu)


def _gwint_fused(x, qweight, scales, zeros, bits, group_size, in_features, norm_weight, eps, residual, use_glu):
    from . import gwint_triton

    if norm_weight is None and not use_glu:
        # only a residual: for one row it is the GEMV's bias, so every M = 1 kernel stays a candidate (the wide
        # one wins at K = 14336); the sum is rounded once, after the add
        N = qweight.shape[1]
        bias = None if residual is None or residual.numel() != N else residual.reshape(N)
        out = gwint_triton.linear(x, qweight, scales, zeros, bits, group_size, in_features, bias=bias)
        return out if bias is not None or residual is None else residual + out
    out = gwint_triton.fused_gemv(x, qweight, scales, zeros, bits, group_size, in_features, norm_weight, eps,
                                  residual, use_glu)
    if out is None:  # the deep kernel does not take it: the unfused ops, the GEMV through the gwint launcher
        norm = None if norm_weight is None else (norm_weight, eps)
        out = compose(x, lambda h: gwint_triton.linear(h, qweight, scales, zeros, bits, group_size, in_features),
                      norm, residual, use_glu)
    return out


@torch.library.custom_op("bitsmith::gwint_fused_linear", mutates_args=())
def _gwint_fused_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    bits: int, group_size: int, in_features: int, norm_weight: torch.Tensor | None, eps: float,
                    residual: torch.Tensor | None, use_glu: bool) -> torch.Tensor:
    # always a fresh tensor (custom ops may not alias inputs): every path ends in a new output or a new sum
    return _gwint_fused(x, qweight, scales, zeros, bits, group_size, in_features, norm_weight, eps, residual,
                        use_glu)


@_gwint_fused_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, in_features, norm_weight, eps, residual, use_glu):
    N = qweight.shape[1]
    return x.new_empty((*x.shape[:-1], N // 2 if use_glu else N))
