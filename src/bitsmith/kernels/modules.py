"""nn.Module replacements for packed weights.

`PackedLinear` holds the packed tensors of one Linear as buffers (so it can be built on the meta device and filled by
`load_state_dict` / transformers' loader), and calls its format's linear op in forward.

On the CPU (no kernels there), forward keeps the exact dequantized weight of the activation dtype between calls,
rebuilt whenever a packed buffer changes: evaluation then costs what the dense model costs, at the dense model's
memory. `BITSMITH_CPU_WEIGHT_CACHE=0` turns this off (dequantize on every call, packed memory only).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..compress.formats import get_format


class PackedLinear(nn.Module):
    def __init__(self, entry: dict, dtype: torch.dtype, bias: bool = False, device: torch.device | str | None = None):
        super().__init__()
        self.format_name = entry["format"]
        self.params = {k: v for k, v in entry.items() if k not in ("format", "format_version")}
        self.in_features = self.params["in_features"]
        self.out_features = self.params["out_features"]
        fmt = get_format(self.format_name)
        self._tensor_names = []
        for suffix, (shape, dt) in fmt.tensor_specs(self.params, dtype).items():
            self.register_buffer(suffix, torch.empty(shape, dtype=dt, device=device))
            self._tensor_names.append(suffix)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def packed_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self._tensor_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        if x.device.type == "cpu" and os.environ.get("BITSMITH_CPU_WEIGHT_CACHE", "1") != "0":
            return nn.functional.linear(x, self._cached_weight(x.dtype), self.bias)
        return get_format(self.format_name).linear(x, self.packed_tensors(), self.params, self.bias)

    @torch.compiler.disable  # a Python-side cache keyed by tensor ids: traced, it would recompile per module
    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        tensors = self.packed_tensors()
        key = (dtype, tuple((id(t), t._version) for t in tensors.values()))  # in-place loads bump _version
        cache = getattr(self, "_weight_cache", None)
        if cache is None or cache[0] != key:
            w = get_format(self.format_name).dequantize(tensors, self.params).to(dtype)
            self._weight_cache = cache = (key, w)
        return cache[1]

    def dequantized_weight(self) -> torch.Tensor:
        return get_format(self.format_name).dequantize(self.packed_tensors(), self.params)

    def extra_repr(self) -> str:
        facts = ", ".join(f"{k}={v}" for k, v in self.params.items() if k not in ("in_features", "out_features"))
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_name}, {facts}"
