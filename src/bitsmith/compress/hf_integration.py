"""Loading bitsmith-packed folders with transformers: the `bitsmith` quant method, `load` and `load_tokenizer`.

A packed folder's config.json says which Linear modules are packed, and how:

    "quantization_config": {"quant_method": "bitsmith", "version": 1,
                            "modules": {"model.layers.0.self_attn.q_proj": {"format": "gwint", "format_version": 1,
                                                                            "in_features": K, "out_features": N, ...}}}

`register()` teaches transformers this quant method. During `from_pretrained` the quantizer, before any weight is
read, (1) checks every module entry against the format whitelist (`formats.check_module_entry`), (2) checks the
safetensors headers: each packed tensor `{module}.{suffix}` must be there with the shape and dtype that its format
prescribes, (3) swaps each listed `nn.Linear` of the meta-device skeleton for a `PackedLinear` whose buffers carry
exactly those names. transformers' loader then copies the packed tensors straight into the buffers, as it does any
other tensor: nothing is dequantized on load, and no key is missing or unexpected.

Only whitelisted format names load (the registry in `formats.py`); nothing in a config is imported or evaluated.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import BitsmithError, CheckpointError
from .formats import QUANT_CONFIG_VERSION, QUANT_METHOD, check_module_entry, format_params, get_format, known_formats

_CONFIG_KEYS = ("quant_method", "version", "modules")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
_MAX_LISTED = 10  # problems quoted in one error message; the rest are counted

def _listing(problems: list[str]) -> str:
    shown = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def validate_modules(modules: object) -> dict[str, dict]:
    """Check `quantization_config.modules` from an untrusted config.json; return it unchanged or raise CheckpointError.

    Every entry must name a whitelisted format and version (`formats.check_module_entry`), and its format must be able
    to derive the packed tensors' shapes from the entry (so a bad bit width or group size fails here, by name).
    """
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError("quantization_config.modules: expected a non-empty object {module name: format entry}")
    for name, entry in modules.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"quantization_config.modules: module names must be non-empty strings, got {name!r}")
        if isinstance(entry, dict) and isinstance(entry.get("format"), str) and entry["format"] not in known_formats():
            raise CheckpointError(
                f"quantization_config.modules[{name!r}]: unknown packed format {entry['format']!r};"
                f" allowed formats: {', '.join(known_formats())}"
            )
        check_module_entry(name, entry)
        try:
            specs = get_format(entry["format"]).tensor_specs(format_params(entry), torch.float16)
            ok = all(isinstance(d, int) and d >= 0 for shape, _ in specs.values() for d in shape)
        except (KeyError, TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(
                f"quantization_config.modules[{name!r}]: bad {entry['format']!r} entry ({type(e).__name__}: {e})"
            ) from None
        if not ok:
            raise CheckpointError(f"quantization_config.modules[{name!r}]: bad {entry['format']!r} entry {entry}")
    return modules


class BitsmithConfig(QuantizationConfigMixin):
    """`quantization_config` of a bitsmith-packed checkpoint: a config version and one format entry per packed module.

    Built by transformers from config.json (`BitsmithConfig.from_dict`), validated on construction, and written back
    by `to_dict()` exactly as read.
    """

    def __init__(self, modules: dict[str, dict] | None = None, version: int = QUANT_CONFIG_VERSION,
                 quant_method: str = QUANT_METHOD, **unknown: Any):
        if unknown:
            raise CheckpointError(
                f"quantization_config: unknown key(s) {sorted(unknown)} (allowed: {', '.join(_CONFIG_KEYS)})"
            )
        if quant_method != QUANT_METHOD:
            raise CheckpointError(f"quantization_config.quant_method: expected {QUANT_METHOD!r}, got {quant_method!r}")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(f"quantization_config.version: expected a positive integer, got {version!r}")
        if version > QUANT_CONFIG_VERSION:
            raise CheckpointError(
                f"quantization_config.version {version} is newer than this bitsmith reads"
                f" (up to {QUANT_CONFIG_VERSION}); upgrade bitsmith"
            )
        self.quant_method = QUANT_METHOD
        self.version = version
        self.modules = validate_modules(modules)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "version": self.version, "modules": copy.deepcopy(self.modules)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()


def _resolve_module(model: nn.Module, by_name: dict[str, nn.Module], name: str) -> tuple[str, nn.Module] | None:
    """Find a config module name among `by_name` (model.named_modules()), with or without the base-model prefix."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [name]
    if prefix:
        candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    for cand in candidates:
        if cand in by_name:
            return cand, by_name[cand]
    return None


def swap_packed_modules(model: nn.Module, modules: dict[str, dict], device: torch.device | str = "meta",
                        dtype: torch.dtype | None = None) -> dict[str, nn.Module]:
    """Replace each listed `nn.Linear` of `model` by an empty `PackedLinear` for its entry (in place).

    `modules` must already be validated (`validate_modules`). The packed buffers are allocated on `device` (meta by
    default: transformers then loads the checkpoint tensors into them). The float dtype (scales, bias) is `dtype`, or
    the replaced Linear's own weight dtype. Returns {config module name: new PackedLinear}. Raises CheckpointError
    listing every listed module that is absent, not a Linear, or of another shape than its entry says.
    """
    from ..kernels.modules import PackedLinear

    problems, plan = [], []
    by_name = dict(model.named_modules())
    for name, entry in modules.items():
        found = _resolve_module(model, by_name, name)
        if found is None:
            problems.append(f"{name}: no such module in {type(model).__name__}")
            continue
        path, linear = found
        if isinstance(linear, PackedLinear):
            problems.append(f"{name}: already packed")
        elif not isinstance(linear, nn.Linear):
            problems.append(f"{name}: is a {type(linear).__name__}, only nn.Linear modules can be packed")
        elif (linear.in_features, linear.out_features) != (entry["in_features"], entry["out_features"]):
            problems.append(
                f"{name}: the model's Linear is {linear.in_features} -> {linear.out_features}, the config says"
                f" {entry['in_features']} -> {entry['out_features']}"
            )
        else:
            plan.append((name, path, entry, linear))
    if problems:
        raise CheckpointError("quantization_config.modules does not fit the model:" + _listing(problems))
    swapped = {}
    for name, path, entry, linear in plan:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        packed = PackedLinear(entry, dtype or linear.weight.dtype, bias=linear.bias is not None, device=device)
        setattr(parent, child, packed)
        swapped[name] = packed
    return swapped


def _safetensors_files(checkpoint_files: list[str] | None) -> list[Path]:
    return [Path(f) for f in checkpoint_files or [] if str(f).endswith(".safetensors")]


def check_checkpoint_tensors(modules: dict[str, dict], packed: dict[str, nn.Module],
                             checkpoint_files: list[str] | None) -> None:
    """Before loading: every packed tensor of every listed module must be in the safetensors files, shaped and typed
    as its format says; a leftover dense `{module}.weight` contradicts the config. Raise CheckpointError listing all.

    `packed` maps the config's module names to their (still empty) PackedLinear. Integer tensors must match the dtype
    exactly (they are loaded bit for bit); float tensors (scales, bias) may be any float dtype (transformers casts
    them to the model's dtype, as it does every other float tensor).
    """
    from .checkpoint import read_safetensors_header

    files = _safetensors_files(checkpoint_files)
    if not files:
        return  # not safetensors (or an in-memory state dict): transformers' own key report is all we get
    header = {}
    for f in files:
        header.update(read_safetensors_header(f))
    problems = []
    for name, module in packed.items():
        expected = {f"{name}.{suffix}": tensor for suffix, tensor in module.packed_tensors().items()}
        if module.bias is not None:
            expected[f"{name}.bias"] = module.bias
        for key, ref in expected.items():
            info = header.get(key)
            if info is None:
                problems.append(f"{key}: missing")
            elif tuple(info.shape) != tuple(ref.shape):
                problems.append(f"{key}: shape {list(info.shape)}, format {modules[name]['format']!r} needs"
                                f" {list(ref.shape)}")
            elif info.dtype != ref.dtype and not (info.dtype.is_floating_point and ref.dtype.is_floating_point):
                problems.append(f"{key}: dtype {info.dtype}, format {modules[name]['format']!r} needs {ref.dtype}")
        if f"{name}.weight" in header:
            problems.append(f"{name}.weight: a dense weight for a module the config says is packed")
    if problems:
        raise CheckpointError(
            f"the packed tensors in {files[0].parent} do not match quantization_config:" + _listing(problems)
        )


class BitsmithHfQuantizer(HfQuantizer):
    """transformers quantizer for quant_method "bitsmith": loads pre-packed checkpoints only (no quantize-on-load).

    Hooks used (transformers 5.x; 4.5x has the same names): `preprocess_model` -> `_process_model_before_weight_loading`
    swaps the Linears on the meta skeleton; the loader fills the buffers; `_dequantize` backs `model.dequantize()`.
    """

    requires_calibration = True
    requires_parameters_quantization = False  # 4.x attribute name; 5.x asks `param_needs_quantization` (False)

    def __init__(self, quantization_config: BitsmithConfig, **kwargs):
        if not kwargs.get("pre_quantized", True):
            raise BitsmithError(
                "bitsmith does not quantize while loading: compress the model first (`bitsmith compress RECIPE MODEL"
                " -o OUT`), then load OUT"
            )
        super().__init__(quantization_config, **kwargs)
        self._checkpoint_files: list[str] | None = None

    def validate_environment(self, *args, **kwargs):
        return

    def preprocess_model(self, model, *args, **kwargs):
        # 5.x passes checkpoint_files on to _process_model_before_weight_loading, 4.5x keeps it: catch it here.
        self._checkpoint_files = kwargs.get("checkpoint_files", self._checkpoint_files)
        return super().preprocess_model(model, *args, **kwargs)

    def _process_model_before_weight_loading(self, model, **kwargs):
        modules = self.quantization_config.modules
        packed = swap_packed_modules(model, modules, device="meta")
        check_checkpoint_tensors(modules, packed, kwargs.get("checkpoint_files", self._checkpoint_files))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        return model

    def _dequantize(self, model, dtype=None):
        """Replace every PackedLinear by a dense nn.Linear holding its exact dequantized weight."""
        from ..kernels.modules import PackedLinear

        for path, module in list(model.named_modules()):
            if not isinstance(module, PackedLinear):
                continue
            weight = module.dequantized_weight()
            dt = dtype or weight.dtype
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=weight.device, dtype=dt)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent_name, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


_REGISTERED = False


def register() -> None:
    """Register quant method "bitsmith" with transformers (idempotent). `import bitsmith` calls it."""
    global _REGISTERED
    if _REGISTERED:
        return
    try:
        from transformers.quantizers import auto
    except ImportError as e:  # pragma: no cover - transformers is a dependency; only a broken install gets here
        raise BitsmithError(f"loading bitsmith checkpoints needs transformers>=4.56 ({e})") from None
    # Another copy of bitsmith (or a reload) may have registered already; the mappings refuse a second registration.
    config_map = getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", {})
    quantizer_map = getattr(auto, "AUTO_QUANTIZER_MAPPING", {})
    if QUANT_METHOD not in config_map:
        auto.register_quantization_config(QUANT_METHOD)(BitsmithConfig)
    if QUANT_METHOD not in quantizer_map:
        auto.register_quantizer(QUANT_METHOD)(BitsmithHfQuantizer)
    _REGISTERED = True


def _local_folder(path: str | os.PathLike) -> Path | None:
    """The local folder `path` names, or None for a Hub repo id; a local-looking path that is missing is an error."""
    p = Path(path).expanduser()
    looks_local = not isinstance(path, str) or path.startswith(("/", "./", "../", "~", ".\\")) or p.exists()
    if not looks_local:
        return None
    if not p.is_dir():
        raise CheckpointError(f"{p}: no such folder")
    return p


def _check_model_folder(path: str | os.PathLike, safetensors_only: bool) -> None:
    p = _local_folder(path)
    if p is None:
        return
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p}: no config.json, not a Hugging Face model folder")
    try:
        json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p / 'config.json'}: unreadable JSON ({e})") from None
    if safetensors_only and not any(p.glob("*.safetensors")):
        raise CheckpointError(f"{p}: no *.safetensors weights (pickled .bin weights are not loaded: they can run code)")


def load(path: str | os.PathLike, device_map: str | dict | None = None, torch_dtype: torch.dtype | str | None = None,
         **kwargs: Any):
    """Load a (packed or dense) causal LM folder or Hub repo with `AutoModelForCausalLM.from_pretrained`.

    Defaults that differ from transformers': safetensors only (`use_safetensors=True`) and no remote code
    (`trust_remote_code=False`); pass either explicitly to override. `torch_dtype` (or `dtype`) defaults to "auto",
    the dtype recorded in config.json. Other keyword arguments go to `from_pretrained` unchanged.
    """
    register()
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("use_safetensors", True)
    _check_model_folder(path, safetensors_only=bool(kwargs["use_safetensors"]))
    kwargs.setdefault("trust_remote_code", False)
    if torch_dtype is not None and kwargs.get("dtype") is not None:
        raise BitsmithError("pass torch_dtype or dtype, not both")
    dtype = kwargs.pop("dtype", None) or torch_dtype or "auto"
    if device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)


def load_tokenizer(path: str | os.PathLike, **kwargs: Any):
    """The tokenizer saved beside a model (`AutoTokenizer.from_pretrained`, no remote code unless asked for)."""
    from transformers import AutoTokenizer

    p = _local_folder(path)
    if p is not None and not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise CheckpointError(f"{p}: no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)})")
    kwargs.setdefault("trust_remote_code", False)
    return AutoTokenizer.from_pretrained(str(path), **kwargs)
