"""Group-wise integer weights (format `gwint`, version 1): packing, exact dequantization, and the linear op.

Layout, for a Linear with weight W [N, K] (N = out_features, K = in_features), `bits` b in 1..8, group size g
(g = K means per output channel), G = ceil(K / g) groups along K (the last one may be partial):

    qweight  int32 [ceil(K / P), N]   P = 32 // b codes per word, packed along K: code of W[n, k] sits in word
                                      qweight[k // P, n] at bits [b * (k % P), b * (k % P) + b). Unused high bits
                                      and padding codes past K are zero.
    scales   fp16|bf16 [G, N]         one scale per (group, output channel), the model's dtype
    zeros    uint8 [G, N]             only when asymmetric: the zero point, in code units

Codes are unsigned, 0 .. 2^b - 1. Dequantization is exact: W[n, k] = (code - z) * scales[k // g, n], where z is
zeros[k // g, n] when asymmetric and 2^(b-1) when symmetric (offset binary: signed q = code - 2^(b-1)).
Layout is K-major so a tile of weights for a K-block is contiguous along N (coalesced loads in the kernels).
"""

from __future__ import annotations

import math
import os

import torch

FORMAT_NAME = "gwint"
FORMAT_VERSION = 1


def codes_per_word(bits: int) -> int:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    return 32 // bits


def num_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / group_size)


def tensor_specs(out_features: int, in_features: int, bits: int, group_size: int, symmetric: bool,
                 dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of the packed tensors of one module (used to build modules on the meta device)."""
    G = num_groups(in_features, group_size)
    specs = {
        "qweight": ((math.ceil(in_features / codes_per_word(bits)), out_features), torch.int32),
        "scales": ((G, out_features), dtype),
    }
    if not symmetric:
        specs["zeros"] = ((G, out_features), torch.uint8)
    return specs


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: integer [N, K] in [0, 2^b) -> qweight int32 [ceil(K/P), N]."""
    N, K = codes.shape
    P = codes_per_word(bits)
    Kp = math.ceil(K / P) * P
    c = torch.zeros((N, Kp), dtype=torch.int64, device=codes.device)
    c[:, :K] = codes.to(torch.int64)
    c = c.view(N, Kp // P, P)  # [N, words, P]
    shifts = torch.arange(P, dtype=torch.int64, device=codes.device) * bits
    words = (c << shifts).sum(dim=-1)  # [N, words], < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).t().contiguous()  # [words, N]


def _unpack_padded(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """qweight int32 [W, N] -> codes int32 [N, W * P] (codes past K included)."""
    P = codes_per_word(bits)
    shifts = torch.arange(P, dtype=torch.int32, device=qweight.device) * bits
    # arithmetic shifts of negative words are harmless: the mask keeps only the code's own bits
    codes = (qweight.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [W, N, P]
    return codes.permute(1, 0, 2).reshape(qweight.shape[1], -1)  # [N, W * P]


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """qweight int32 [ceil(K/P), N] -> codes uint8 [N, K]."""
    return _unpack_padded(qweight, bits)[:, :in_features].to(torch.uint8)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               in_features: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Exact float weight [N, K] (computed in float32, returned in `dtype`, default the scales' dtype)."""
    G, N = scales.shape
    codes = _unpack_padded(qweight, bits)  # [N, W * P]
    Kg = G * group_size
    if codes.shape[1] >= Kg:
        codes = codes[:, :Kg]
    else:  # the packed width is shorter than whole groups: pad with zero codes (sliced off below)
        codes = torch.nn.functional.pad(codes, (0, Kg - codes.shape[1]))
    w = codes.view(N, G, group_size).to(torch.float32)  # groups broadcast, no per-element gather
    if zeros is None:
        w -= float(1 << (bits - 1))
    else:
        w -= zeros.t().to(torch.float32).unsqueeze(-1)
    w *= scales.t().to(torch.float32).unsqueeze(-1)
    return w.view(N, Kg)[:, :in_features].to(dtype or scales.dtype)


def linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] through the exact dequantized weight (the torch reference path)."""
    w = dequantize(qweight, scales, zeros, bits, group_size, in_features, dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)


def use_triton(x: torch.Tensor) -> bool:
    """Triton when x is on CUDA (or BITSMITH_TRITON=1 forces it, e.g. with TRITON_INTERPRET=1 on CPU) and is fp16/bf16.

    BITSMITH_TRITON=0 turns the kernels off everywhere.
    """
    flag = os.environ.get("BITSMITH_TRITON", "")
    if flag == "0" or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return x.is_cuda or flag == "1"


def linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
           group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The op packed modules call: Triton kernels (`gwint_triton`) on CUDA, the torch reference elsewhere.

    Under `torch.compile` the Triton path goes through the opaque custom op `bitsmith::gwint_linear`, so the
    graph has no break at a packed Linear and the compiler fuses the ops around it; eager calls skip the op's
    dispatch cost and launch directly."""
    if use_triton(x):
        if torch.compiler.is_compiling():
            return torch.ops.bitsmith.gwint_linear(x, qweight, scales, zeros, bits, group_size, in_features, bias)
        from . import gwint_triton

        return gwint_triton.linear(x, qweight, scales, zeros, bits, group_size, in_features, bias)
    return linear_reference(x, qweight, scales, zeros, bits, group_size, in_features, bias)


@torch.library.custom_op("bitsmith::gwint_linear", mutates_args=())
def _gwint_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    from . import gwint_triton

    # the result is a view of a freshly allocated output, never of an input (custom ops may not alias inputs)
    return gwint_triton.linear(x, qweight, scales, zeros, bits, group_size, in_features, bias)


@_gwint_linear_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, in_features, bias):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))  # [..., K] -> [..., N]
