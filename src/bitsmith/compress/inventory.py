"""What modules a checkpoint holds, read before any weight: names, classes, weight shapes; and target matching.

Module classes come from the transformers architecture named in config.json, instantiated on the meta device (no
memory, no weights read). For an architecture transformers does not know (and we never run remote code for it),
2-D weights are taken to be Linear layers, `embed` in the name makes an Embedding, and this is said in the plan.
Shapes in the checkpoint are checked against the ones the config implies.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch

from .errors import CheckpointError, PlanError


@dataclass(frozen=True)
class ModuleInfo:
    name: str  # "model.layers.0.mlp.down_proj"
    class_names: tuple[str, ...]  # the class and its bases, most derived first: ("Linear", "Module")
    weight: str | None  # checkpoint tensor name of its weight, None when not stored (tied)
    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    tied_to: str | None = None  # module whose weight this one shares

    @property
    def class_name(self) -> str:
        return self.class_names[0]


@dataclass
class Inventory:
    modules: dict[str, ModuleInfo]
    architecture: str
    notes: list[str] = field(default_factory=list)

    def by_weight(self) -> dict[str, ModuleInfo]:
        return {m.weight: m for m in self.modules.values() if m.weight}


def _meta_model(config: dict):
    """Instantiate the architecture on the meta device, or None when transformers does not know it."""
    try:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    model_type = config.get("model_type")
    if not model_type:
        return None
    cfg_dict = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config", "auto_map")}
    try:
        hf_config = AutoConfig.for_model(model_type, **cfg_dict)
    except (ValueError, KeyError, TypeError):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for auto in (AutoModelForCausalLM, AutoModel):
            try:
                with torch.device("meta"):
                    return auto.from_config(hf_config, trust_remote_code=False)
            except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError):
                continue
    return None


def build_inventory(config: dict, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                    packed_modules: set[str] = frozenset()) -> Inventory:
    """tensors: checkpoint name -> (shape, dtype). packed_modules: modules already stored in a packed format."""
    model = _meta_model(config)
    modules: dict[str, ModuleInfo] = {}
    notes: list[str] = []
    if model is not None:
        arch = type(model).__name__
        tied_names = _tied_weight_names(model)
        mismatches = []
        for mod_name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if not isinstance(w, torch.Tensor) or mod_name in packed_modules:
                continue
            wname = f"{mod_name}.weight"
            classes = tuple(c.__name__ for c in type(mod).__mro__ if c is not object)
            if wname in tensors:
                shape, dtype = tensors[wname]
                if tuple(w.shape) != tuple(shape):
                    mismatches.append(f"{wname}: stored {list(shape)}, config implies {list(w.shape)}")
                modules[mod_name] = ModuleInfo(mod_name, classes, wname, tuple(shape), dtype)
            elif wname in tied_names:
                modules[mod_name] = ModuleInfo(mod_name, classes, None, tuple(w.shape), None,
                                               tied_to=tied_names[wname])
        if mismatches:
            raise CheckpointError(
                f"tensor shapes contradict config.json ({config.get('model_type')}): " + "; ".join(mismatches[:8])
                + (f"; and {len(mismatches) - 8} more" if len(mismatches) > 8 else "")
            )
    else:
        arch = str((config.get("architectures") or ["unknown"])[0])
        notes.append(f"architecture {arch!r} is not known to transformers here: module classes guessed from shapes")
    # Weights not matched to a meta-model module (unknown architecture, renamed keys): classify by shape.
    known = {m.weight for m in modules.values()}
    for name, (shape, dtype) in tensors.items():
        if not name.endswith(".weight") or name in known:
            continue
        mod_name = name[: -len(".weight")]
        if mod_name in packed_modules:
            continue
        if len(shape) == 2:
            cls = ("Embedding", "Module") if "embed" in mod_name else ("Linear", "Module")
        else:
            cls = ("Module",)
        modules[mod_name] = ModuleInfo(mod_name, cls, name, tuple(shape), dtype)
    return Inventory(modules, arch, notes)


def _tied_weight_names(model) -> dict[str, str]:
    """{tied weight name: the weight it shares storage with} as transformers declares them."""
    out: dict[str, str] = {}
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers 5: {target: source}
    if isinstance(tied, dict) and tied:
        for target, source in tied.items():
            out[target] = source
        return out
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if emb is not None and head is not None and id(head) in names:
            out[f"{names[id(head)]}.weight"] = f"{names[id(emb)]}.weight"
    return out


# --- target selection --------------------------------------------------------------------------------------------

def _pattern_matches(pattern: str, module: ModuleInfo) -> bool:
    if pattern.startswith("re:"):  # the regex must match the whole module name
        return re.fullmatch(pattern[3:], module.name) is not None
    # a bare name: a class name (the class or a base) or, failing that, a module-name suffix ("lm_head", "down_proj")
    return pattern in module.class_names or module.name == pattern or module.name.endswith("." + pattern)


def check_pattern(pattern: str, where: str) -> None:
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise PlanError(f"{where}: bad regular expression {pattern!r}: {e}") from None


def select(inventory: Inventory, targets: tuple[str, ...], ignore: tuple[str, ...], where: str
           ) -> tuple[list[ModuleInfo], dict[str, str]]:
    """Modules matched by `targets` and not by `ignore`, and {module: reason} for matched-but-skipped ones.

    A target pattern that matches no module at all is a PlanError that lists what exists.
    """
    for p in (*targets, *ignore):
        check_pattern(p, where)
    chosen: list[ModuleInfo] = []
    skipped: dict[str, str] = {}
    for pattern in targets:
        if not any(_pattern_matches(pattern, m) for m in inventory.modules.values()):
            classes = sorted({m.class_name for m in inventory.modules.values()})
            examples = [m for m in inventory.modules][:6]
            raise PlanError(
                f"{where}: target {pattern!r} matches no module. Module classes here: {', '.join(classes)};"
                f" module names look like: {', '.join(examples)} (use 're:<regex>' to match names)"
            )
    for m in inventory.modules.values():
        if not any(_pattern_matches(p, m) for p in targets):
            continue
        hit = next((p for p in ignore if _pattern_matches(p, m)), None)
        if hit is not None:
            skipped[m.name] = f"ignored by {hit!r}"
        elif m.weight is None:
            skipped[m.name] = f"weight tied to {m.tied_to} (not stored separately)"
        else:
            chosen.append(m)
    return chosen, skipped


def non_matrix_reasons(modules) -> dict[str, str]:
    """{module name: why a weight-matrix pass skips it}: weights that are not 2-D, or not floating point."""
    skipped = {}
    for m in modules:
        if m.shape is None or len(m.shape) != 2:
            skipped[m.name] = f"weight is not a matrix (shape {list(m.shape or [])})"
        elif m.dtype is not None and not m.dtype.is_floating_point:
            skipped[m.name] = f"weight dtype {m.dtype} is not floating point"
    return skipped


def inventory_from_model(model: torch.nn.Module) -> Inventory:
    """The inventory of a live model: its own module classes and weights (tied weights listed once)."""
    modules: dict[str, ModuleInfo] = {}
    seen: dict[int, str] = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        classes = tuple(c.__name__ for c in type(mod).__mro__ if c is not object)
        if id(w) in seen:
            modules[name] = ModuleInfo(name, classes, None, tuple(w.shape), w.dtype, tied_to=seen[id(w)])
        else:
            seen[id(w)] = name
            modules[name] = ModuleInfo(name, classes, f"{name}.weight", tuple(w.shape), w.dtype)
    return Inventory(modules, type(model).__name__)
