"""The Python API: `compress` (recipe over a checkpoint folder), `apply` (passes on an in-memory model), `load`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

# Pass machinery (pydantic) is imported inside the functions, so `import bitsmith` stays light.


def compress(recipe, model: str | Path, output: str | Path, *, overrides: Sequence[str] = (), overwrite: bool = False,
             shard_size: str | int = "5GB", allow_pickle: bool = False, device: str = "cpu", progress: bool = True,
             workers: int = 1):
    """Apply a recipe (bundled name, YAML path, or a `Recipe`) to a checkpoint folder (or Hub id); returns a Summary."""
    from .compress.pipeline import run
    from .compress.recipe import Recipe, load_recipe
    from .compress.writer import parse_size

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(str(recipe), list(overrides))
    return run(recipe, model, output, overwrite=overwrite, shard_bytes=parse_size(shard_size),
               allow_pickle=allow_pickle, device=device, progress=progress, workers=workers)


def apply(model: nn.Module, passes, *, model_path: str | Path | None = None, device: str | None = None,
          progress: bool = False) -> nn.Module:
    """Apply passes to a model in memory, in order; packed layers become `PackedLinear` modules.

    `passes`: pass configs, a `Recipe`, or a bundled recipe name / YAML path. Tensor passes run weight by weight.
    Model passes get the model itself; a packing model pass (`rounding: gptq` on finequant, bipolar, bcq) returns
    its packed weights, and their Linears are replaced by `PackedLinear` modules just as a packing tensor pass's
    are, so the model computes with the packed format either way. Checkpoint passes need a folder: use `compress`.

    `model_path`: the folder the model was loaded from, if any; it plays the part of `compress`'s input folder
    (the default calibration tokenizer, the default `recover` teacher). Without it, calibrating passes need their
    own `tokenizer:` setting. `device`: where model passes compute (default: the model's device).
    """
    from .compress.errors import PlanError
    from .compress.inventory import inventory_from_model, select
    from .compress.passes import PassKind, TensorState, handler_for
    from .compress.pipeline import PassContext
    from .compress.recipe import Recipe, load_recipe

    if isinstance(passes, (str, Path)):
        passes = load_recipe(str(passes))
    if isinstance(passes, Recipe):
        passes = passes.passes
    if device is None:
        device = str(next(model.parameters()).device)
    ctx = PassContext(input_path=Path(model_path) if model_path is not None else None, device=device,
                      progress=progress)
    for i, cfg in enumerate(passes):
        handler = handler_for(cfg)
        if cfg.kind is PassKind.MODEL:
            result = handler.apply(cfg, model, ctx)
            if cfg.packs:  # {weight name: TensorState} of the packed weights
                named = dict(model.named_modules())
                for state in result.values():
                    if state.packed is not None:
                        _install_packed(model, named, state)
            continue
        if cfg.kind is PassKind.CHECKPOINT:
            raise PlanError(f"pass {i} ({cfg.type}) is a checkpoint pass: use bitsmith.compress on a folder")
        named = dict(model.named_modules())
        chosen, skipped = select(inventory_from_model(model), cfg.targets, cfg.ignore, f"pass {i} ({cfg.type})")
        if handler.plan is not None:
            skipped.update(handler.plan(cfg, chosen))
        for info in chosen:
            if info.name in skipped:
                continue
            module = named[info.name]
            state = handler.apply(cfg, TensorState(info.weight, module.weight.detach().clone(), info.name,
                                                   info.class_name), None)
            if state.packed is not None:
                _install_packed(model, named, state)
            else:
                with torch.no_grad():
                    module.weight.copy_(state.tensor)
    return model


def _install_packed(model: nn.Module, named: dict[str, nn.Module], state) -> None:
    """Replace the Linear `state.module` by a PackedLinear holding `state.packed` (on the Linear's device, in its
    dtype, with its bias)."""
    from .kernels.modules import PackedLinear

    module = named[state.module]
    packed = PackedLinear(state.packed.module_entry(), module.weight.dtype, bias=module.bias is not None,
                          device=module.weight.device)
    for suffix, t in state.packed.tensors.items():
        getattr(packed, suffix).copy_(t)
    if module.bias is not None:
        packed.bias.data.copy_(module.bias.data)
    parent_name, _, child = state.module.rpartition(".")
    setattr(named[parent_name] if parent_name else model, child, packed)
    named[state.module] = packed


def load(path: str | Path, **kwargs):
    """Load an original or bitsmith-compressed folder as a transformers model (packed layers stay packed)."""
    from .compress.hf_integration import load as _load

    return _load(path, **kwargs)


def load_tokenizer(path: str | Path, **kwargs):
    """The tokenizer of a model folder (no remote code)."""
    from .compress.hf_integration import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path, **kwargs)
