"""Sources of tensors for the pipeline: a checkpoint folder, a fused sweep of tensor passes over another source,
or a materialized model after a model pass. All are read one tensor at a time, by name.

The plan-time view of a source (`SourceView`: config and tensor shapes/dtypes, no data) is what recipes are
validated against before any weight is read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .checkpoint import CheckpointReader
from .errors import CheckpointError
from .passes import PassConfig, PassHandler, TensorState


@dataclass
class SourceView:
    config: dict
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)
    packed_modules: dict[str, dict] = field(default_factory=dict)  # already packed in the input: module -> entry

    def copy(self) -> "SourceView":
        return SourceView(copy.deepcopy(self.config), dict(self.tensors), dict(self.packed_modules))


class Source(Protocol):
    view: SourceView

    def names(self) -> list[str]: ...

    def read(self, name: str) -> TensorState: ...

    def side_files(self) -> dict[str, Path | bytes]: ...


class CheckpointSource:
    """A checkpoint folder, streamed in file order."""

    def __init__(self, reader: CheckpointReader):
        self.reader = reader
        qc = reader.config.get("quantization_config") or {}
        packed = dict(qc.get("modules", {})) if qc.get("quant_method") == "bitsmith" else {}
        self.view = SourceView(copy.deepcopy(reader.config),
                               {n: (i.shape, i.dtype) for n, i in reader.tensors.items()}, packed)

    def names(self) -> list[str]:
        return sorted(self.reader.tensors, key=lambda n: (self.reader.tensors[n].file, n))

    def read(self, name: str) -> TensorState:
        return TensorState(name, self.reader.get(name))

    def side_files(self) -> dict[str, Path | bytes]:
        return {p.name: p for p in self.reader.side_files() if p.name != "README.md"}


@dataclass
class FusedStep:
    config: PassConfig
    handler: PassHandler
    targets: dict[str, tuple[str, str]]  # weight tensor name -> (module name, module class)
    index: int  # position in the recipe


class SweepSource:
    """Consecutive tensor passes fused over an inner source: each targeted weight goes through every step in order."""

    def __init__(self, inner: Source, steps: list[FusedStep], ctx):
        self.inner, self.steps, self.ctx = inner, steps, ctx
        self.view = inner.view  # tensor passes keep names; packed shapes are decided at write time

    def names(self) -> list[str]:
        return self.inner.names()

    def read(self, name: str) -> TensorState:
        state = self.inner.read(name)
        device = torch.device(getattr(self.ctx, "device", "cpu") or "cpu")
        on_device = device.type != "cpu" and any(name in step.targets for step in self.steps)
        if on_device:  # a targeted weight goes through its passes on the accelerator, one tensor at a time
            state.tensor = state.tensor.to(device)
        for step in self.steps:
            hit = step.targets.get(name)
            if hit is None:
                continue
            state.module, state.module_class = hit
            if state.tensor.is_floating_point() and not bool(torch.isfinite(state.tensor).all()):
                bad = int((~torch.isfinite(state.tensor)).sum())
                raise CheckpointError(f"tensor {name!r}: {bad} NaN/Inf values; passes[{step.index}]"
                                      f" ({step.config.type}) cannot transform it (fix the checkpoint, or add the"
                                      f" module to the pass's ignore list)")
            state = step.handler.apply(step.config, state, self.ctx)
        if on_device:  # everything downstream (writer, hashing, later model passes) works on CPU tensors
            state.tensor = state.tensor.cpu()
            if state.packed is not None:
                state.packed.tensors.update({k: t.cpu() for k, t in state.packed.tensors.items()})
        return state

    def side_files(self) -> dict[str, Path | bytes]:
        return self.inner.side_files()


class ModelSource:
    """A model held in memory (after a model pass): serves the same tensor names as the source it was built from.

    `packed`: the states a packing model pass (e.g. GPTQ rounding) produced, by weight name, served as they are.
    """

    def __init__(self, model: torch.nn.Module, built_from: Source, packed: dict[str, TensorState] | None = None):
        self.model = model
        self.view = built_from.view
        self._names = built_from.names()
        self._side = built_from.side_files()
        self._state = model.state_dict()
        self._packed = dict(packed or {})

    def names(self) -> list[str]:
        return self._names

    def read(self, name: str) -> TensorState:
        if name in self._packed:
            return self._packed.pop(name)  # each tensor is read once
        return TensorState(name, self._state[name].detach().clone())

    def side_files(self) -> dict[str, Path | bytes]:
        return self._side


def materialize(source: Source, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the transformers model of a source's config and fill it with the source's (dense) tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in source.view.config.items() if k not in ("quantization_config",)}
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    dtype = next((dt for _, dt in source.view.tensors.values() if dt.is_floating_point), torch.float32)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)  # buffers (rotary...) built by the class
    state = {name: source.read(name).tensor for name in source.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(f"cannot build the model for a model pass: missing tensors {missing[:5]},"
                              f" unexpected tensors {unexpected[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device).eval()
