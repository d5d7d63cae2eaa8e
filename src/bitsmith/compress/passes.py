"""The pass API: typed pass configs, the three pass kinds, and one explicit registry.

A pass is a frozen pydantic config (a `type` discriminator, `extra="forbid"`, a `version`) plus a handler registered for
that config class. Handlers by kind:

- tensor pass: `apply(config, state: TensorState, ctx) -> TensorState`, one targeted weight at a time. Consecutive
  tensor passes fuse into one streaming sweep. `plan(config, modules) -> {module: skip reason}` may refuse modules.
- model pass: `apply(config, model, ctx) -> None` on the materialized model (calibration text, fine-tuning...).
- checkpoint pass: `apply(config, source, ctx) -> Source` (several inputs, a new vocabulary...), with
  `plan(config, view) -> view` describing the checkpoint it will produce, so the rest of the recipe validates first.

Third-party passes register through the entry-point group `bitsmith.passes`: each entry point names a callable that
calls `register_pass(...)`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from .errors import RecipeError
from .formats import PackedTensor

ENTRY_POINT_GROUP = "bitsmith.passes"


class PassKind(str, enum.Enum):
    TENSOR = "tensor"
    MODEL = "model"
    CHECKPOINT = "checkpoint"


class PassConfig(BaseModel):
    """Base of every pass config. Subclasses set `type: Literal["name"] = "name"` and `kind`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    version: int = 1

    kind: ClassVar[PassKind] = PassKind.TENSOR
    packs: ClassVar[bool] = False  # writes a packed format (a later model pass then cannot change its weights)


class TargetedPass(PassConfig):
    """A pass that acts on modules chosen by `targets` (class names, or `re:` regexes on module names) less `ignore`."""

    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ("lm_head",)

    @field_validator("targets", "ignore", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v


@dataclass
class TensorState:
    """One weight flowing through a fused sweep.

    `tensor` is always the dense value the model computes with (after fake-quantization, masking...), so passes chain;
    `packed` is what will be stored instead, when a pass packed the weight.
    """

    name: str  # checkpoint tensor name, e.g. "model.layers.0.mlp.down_proj.weight"
    tensor: torch.Tensor  # [out_features, in_features] for a Linear weight
    module: str | None = None  # "model.layers.0.mlp.down_proj"
    module_class: str | None = None  # "Linear"
    packed: PackedTensor | None = None
    facts: dict = field(default_factory=dict)  # per-pass notes for the summary (e.g. chosen group size, error)


@dataclass(frozen=True)
class PassHandler:
    config_cls: type[PassConfig]
    apply: Callable
    plan: Callable | None = None


_REGISTRY: dict[str, PassHandler] = {}
_plugins_loaded = False


def register_pass(config_cls: type[PassConfig], *, apply: Callable, plan: Callable | None = None) -> None:
    type_name = config_cls.model_fields["type"].default
    if not isinstance(type_name, str):
        raise TypeError(f"{config_cls.__name__}: field 'type' needs a default string (the pass name)")
    existing = _REGISTRY.get(type_name)
    if existing is not None and existing.config_cls is not config_cls:
        raise ValueError(f"pass type {type_name!r} is registered twice ({existing.config_cls} and {config_cls})")
    _REGISTRY[type_name] = PassHandler(config_cls, apply, plan)


def _load_builtin_passes() -> None:
    # Importing these modules registers their passes. Explicit list: no package walking.
    from .. import quant  # noqa: F401  (finequant, bipolar, bcq)
    from .. import prune  # noqa: F401
    from .. import tokenizers  # noqa: F401
    from .. import merge  # noqa: F401


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    _load_builtin_passes()
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception as e:  # a broken plugin must not hide the others, but must be visible
            raise RecipeError(f"plugin pass {ep.name!r} ({ep.value}) failed to load: {e}") from e


def get_handler(type_name: str) -> PassHandler:
    _load_plugins()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise RecipeError(f"unknown pass type {type_name!r} (known: {', '.join(known_passes())})") from None


def known_passes() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def handler_for(config: PassConfig) -> PassHandler:
    return get_handler(config.type)
