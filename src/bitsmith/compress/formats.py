"""Packed weight formats: one class per format, registered by name; only registered names load from a config.

A module's entry in `config.json["quantization_config"]["modules"]` is a flat dict of format facts:
`{"format": "gwint", "format_version": 1, "in_features": K, "out_features": N, ...format params}`.
Each format class turns those facts into the packed tensors' names/shapes/dtypes, dequantizes them exactly,
and runs the linear op (Triton on CUDA, torch reference elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from .errors import CheckpointError

QUANT_METHOD = "bitsmith"
QUANT_CONFIG_VERSION = 1


@dataclass
class PackedTensor:
    """What a packing pass leaves on a Linear: the format facts and the tensors stored under `{module}.{suffix}`."""

    format: str
    params: dict  # format facts, JSON-serialisable (bits, group_size, in_features, out_features, ...)
    tensors: dict[str, torch.Tensor]

    def module_entry(self) -> dict:
        fmt = get_format(self.format)
        return {"format": self.format, "format_version": fmt.version, **self.params}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class PackedFormat:
    """Base class: subclasses set `name`, `version`, `loadable_versions` and implement the three methods."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    loadable_versions: ClassVar[tuple[int, ...]] = (1,)

    def check_params(self, params: dict) -> str | None:
        """A description of what is wrong with untrusted format facts, or None when they are usable."""
        return None

    def tensor_specs(self, params: dict, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], params: dict) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], params: dict,
               bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def sparsity(self, params: dict) -> float:
        """Share of the logical weights the format does not store (0 for dense layouts; sparse ones override)."""
        return float(params.get("sparsity", 0.0))

    def bits_per_weight(self, params: dict, dtype: torch.dtype) -> float:
        """Stored bits per logical weight, everything (scales, indexes) counted."""
        total = 0
        for shape, dt in self.tensor_specs(params, dtype).values():
            n = 1
            for d in shape:
                n *= d
            total += n * torch.empty((), dtype=dt).element_size() * 8
        return total / (params["in_features"] * params["out_features"])


_FORMATS: dict[str, PackedFormat] = {}

# Modules that define (and register) the other built-in formats, imported on first use. An explicit list: formats are
# never discovered by walking packages, and a config can only name a format registered here.
_BUILTIN_FORMAT_MODULES = (
    "bitsmith.kernels.bitplane",  # bipolar-INT and BCQ
    "bitsmith.kernels.bsr",  # block-sparse
    "bitsmith.kernels.rf8",  # RF8 (DeepShape)
)
_builtins_loaded = False


def register_format(cls: type[PackedFormat]) -> type[PackedFormat]:
    _FORMATS[cls.name] = cls()
    return cls


def _load_builtin_formats() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import importlib

    for mod in _BUILTIN_FORMAT_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but something it needs is missing: a real error
                raise


def get_format(name: str) -> PackedFormat:
    _load_builtin_formats()
    try:
        return _FORMATS[name]
    except KeyError:
        raise CheckpointError(f"unknown packed format {name!r} (known: {', '.join(sorted(_FORMATS))})") from None


def known_formats() -> list[str]:
    _load_builtin_formats()
    return sorted(_FORMATS)


def check_module_entry(module: str, entry: object) -> dict:
    """Validate one quantization_config module entry from an untrusted config: whitelisted format and version."""
    if not isinstance(entry, dict) or not isinstance(entry.get("format"), str):
        raise CheckpointError(f"quantization_config.modules[{module!r}]: expected an object with a 'format' name")
    try:
        fmt = get_format(entry["format"])
    except CheckpointError as e:
        raise CheckpointError(f"quantization_config.modules[{module!r}]: {e}") from None
    version = entry.get("format_version", 1)
    if version not in fmt.loadable_versions:
        raise CheckpointError(
            f"quantization_config.modules[{module!r}]: format {fmt.name!r} version {version!r} is not supported by"
            f" this bitsmith (supported: {list(fmt.loadable_versions)}); upgrade bitsmith"
        )
    for key in ("in_features", "out_features"):
        if not isinstance(entry.get(key), int) or entry[key] <= 0:
            raise CheckpointError(f"quantization_config.modules[{module!r}]: missing or bad {key!r}")
    problem = fmt.check_params(format_params(entry))
    if problem:
        raise CheckpointError(f"quantization_config.modules[{module!r}]: {problem}")
    return entry


def format_params(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("format", "format_version")}


@register_format
class GroupwiseIntFormat(PackedFormat):
    """Group-wise integer weights (FineQuant, int8 per-channel, ...); layout in `bitsmith.kernels.gwint`."""

    name = "gwint"
    version = 1
    loadable_versions = (1,)

    def check_params(self, params):
        bits, group = params.get("bits"), params.get("group_size")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            return f"gwint 'bits' must be an integer 1..8, got {bits!r}"
        if not isinstance(group, int) or isinstance(group, bool) or group <= 0:
            return f"gwint 'group_size' must be a positive integer, got {group!r}"
        if not isinstance(params.get("symmetric", True), bool):
            return "gwint 'symmetric' must be true or false"
        return None

    def tensor_specs(self, params, dtype):
        from ..kernels import gwint

        return gwint.tensor_specs(params["out_features"], params["in_features"], params["bits"],
                                  params["group_size"], params.get("symmetric", True), dtype)

    def dequantize(self, tensors, params):
        from ..kernels import gwint

        return gwint.dequantize(tensors["qweight"], tensors["scales"], tensors.get("zeros"), params["bits"],
                                params["group_size"], params["in_features"])

    def linear(self, x, tensors, params, bias):
        from ..kernels import gwint

        return gwint.linear(x, tensors["qweight"], tensors["scales"], tensors.get("zeros"), params["bits"],
                            params["group_size"], params["in_features"], bias)
