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


def apply(model: nn.Module, passes: Sequence) -> nn.Module:
    """Apply tensor passes to a model in memory, in order; packed layers become `PackedLinear` modules.

    Model passes get the model itself. Checkpoint passes need a folder: use `compress`.
    """
    from .compress.errors import PlanError
    from .compress.inventory import inventory_from_model, select
    from .compress.passes import PassKind, TensorState, handler_for
    from .kernels.modules import PackedLinear

    for i, cfg in enumerate(passes):
        handler = handler_for(cfg)
        if cfg.kind is PassKind.MODEL:
            handler.apply(cfg, model, None)
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
                packed = PackedLinear(state.packed.module_entry(), module.weight.dtype,
                                      bias=module.bias is not None, device=module.weight.device)
                for suffix, t in state.packed.tensors.items():
                    getattr(packed, suffix).copy_(t)
                if module.bias is not None:
                    packed.bias.data.copy_(module.bias.data)
                parent_name, _, child = info.name.rpartition(".")
                setattr(named[parent_name] if parent_name else model, child, packed)
            else:
                with torch.no_grad():
                    module.weight.copy_(state.tensor)
    return model


def load(path: str | Path, **kwargs):
    """Load an original or bitsmith-compressed folder as a transformers model (packed layers stay packed)."""
    from .compress.hf_integration import load as _load

    return _load(path, **kwargs)


def load_tokenizer(path: str | Path, **kwargs):
    """The tokenizer of a model folder (no remote code)."""
    from .compress.hf_integration import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path, **kwargs)
