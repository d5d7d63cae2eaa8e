"""Integrity check of an output folder, before it is published: index vs shards, headers, config vs tensors.

`verify_folder(path)` returns the list of problems found (empty when the folder is sound); `check_folder(path)`
raises one `CheckpointError` listing them. Only headers are read (never tensor data), so the check is cheap even for
large checkpoints. What is checked:

- config.json exists and is a JSON object; bitsmith.json / eval_results.json / recipe.yaml, when present, parse.
- weights: `model.safetensors`, or `model.safetensors.index.json` whose every shard exists, has a sound header
  (offsets inside the file, sizes matching shapes) and holds exactly the tensors the index maps to it; no tensor in
  two shards; no `.safetensors` file the index does not list; not both a single file and an index.
- `quantization_config` (bitsmith): version supported; each module's format is known, and the module's tensors are
  exactly the format's tensors (names, shapes, integer dtypes; float tensors must be floating point), plus an
  optional `bias` of shape [out_features], and no leftover `weight`; no packed-looking tensor without an entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TensorInfo, read_safetensors_header
from .errors import CheckpointError

MAX_LISTED = 20  # problems shown in check_folder's message; the rest are counted
_PACKED_SUFFIXES = ("qweight", "scales", "zeros")  # tensor names that only packed modules have


def verify_folder(path: str | os.PathLike) -> list[str]:
    """All integrity problems of the folder at `path`, one human-readable line each (file names relative)."""
    folder = Path(path)
    if not folder.is_dir():
        return [f"{folder.name or folder}: not a folder"]
    problems: list[str] = []
    config = _check_json_files(folder, problems)
    tensors = _check_weights(folder, problems)
    if config is not None and tensors is not None:
        _check_quantization(config, tensors, problems)
    return problems


def check_folder(path: str | os.PathLike) -> None:
    """Raise CheckpointError listing every integrity problem of the folder; return None when it is sound."""
    problems = verify_folder(path)
    if not problems:
        return
    shown = "\n".join(f"  - {p}" for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise CheckpointError(
        f"{path}: the folder fails its integrity check ({len(problems)} problem{'s' if len(problems) > 1 else ''});"
        f" fix or re-create it (bitsmith compress) before publishing:\n{shown}{more}"
    )


# --- side files ----------------------------------------------------------------------------------------------------
def _check_json_files(folder: Path, problems: list[str]) -> dict | None:
    config = None
    config_path = folder / "config.json"
    if not config_path.is_file():
        problems.append("config.json: missing (not a Hugging Face model folder)")
    else:
        config = _load_json(config_path, problems)
        if config is not None and not isinstance(config, dict):
            problems.append("config.json: not a JSON object")
            config = None
    provenance = folder / "bitsmith.json"
    if provenance.is_file():
        data = _load_json(provenance, problems)
        if data is not None and not isinstance(data, dict):
            problems.append("bitsmith.json: not a JSON object")
    results = folder / "eval_results.json"
    if results.is_file():
        data = _load_json(results, problems)
        if data is not None and not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
            problems.append("eval_results.json: not a list of records (JSON objects)")
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        import yaml

        try:
            yaml.safe_load(recipe.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            problems.append(f"recipe.yaml: not valid YAML ({_one_line(e)})")
    return config


def _load_json(path: Path, problems: list[str]):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name}: not valid JSON ({e})")
        return None


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# --- weights -------------------------------------------------------------------------------------------------------
def _header(folder: Path, file: str, problems: list[str]) -> dict[str, TensorInfo] | None:
    try:
        return read_safetensors_header(folder / file)
    except CheckpointError as e:
        # read_safetensors_header names the file with its full path; keep the message relative to the folder
        problems.append(str(e).replace(str(folder / file), file, 1))
        return None
    except OSError as e:
        problems.append(f"{file}: cannot be read ({e.strerror or e})")
        return None


def _check_weights(folder: Path, problems: list[str]) -> dict[str, TensorInfo] | None:
    """Tensor infos of the folder's weights, or None when they cannot be established."""
    index_path = folder / SAFETENSORS_INDEX
    single = folder / SAFETENSORS_SINGLE
    on_disk = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if index_path.is_file() and single.is_file():
        problems.append(
            f"both {SAFETENSORS_SINGLE} and {SAFETENSORS_INDEX} are present: loaders disagree on which one holds the"
            " weights; keep one"
        )
    if index_path.is_file():
        return _check_index(folder, index_path, on_disk, problems)
    if single.is_file():
        strays = [n for n in on_disk if n != SAFETENSORS_SINGLE]
        for name in strays:
            problems.append(f"{name}: a .safetensors file beside {SAFETENSORS_SINGLE} that nothing refers to")
        return _header(folder, SAFETENSORS_SINGLE, problems)
    if on_disk:
        problems.append(
            f"weights {', '.join(on_disk)} have no {SAFETENSORS_INDEX} (a single file must be named {SAFETENSORS_SINGLE})"
        )
    else:
        problems.append(f"no weights: expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} with its shards")
    return None


def _check_index(folder: Path, index_path: Path, on_disk: list[str], problems: list[str]) -> dict | None:
    index = _load_json(index_path, problems)
    if index is None:
        return None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        problems.append(f"{SAFETENSORS_INDEX}: no 'weight_map' object (tensor name -> shard file)")
        return None
    by_file: dict[str, list[str]] = {}
    bad_names = False
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or "/" in file or "\\" in file or file.startswith(".."):
            problems.append(f"{SAFETENSORS_INDEX}: tensor {name!r} points at a bad file name {file!r}")
            bad_names = True
            continue
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, TensorInfo] = {}
    complete = not bad_names
    for file in sorted(by_file):
        if not (folder / file).is_file():
            problems.append(f"{SAFETENSORS_INDEX}: shard {file} is missing ({len(by_file[file])} tensors listed in it)")
            complete = False
            continue
        header = _header(folder, file, problems)
        if header is None:
            complete = False
            continue
        listed = set(by_file[file])
        for name in sorted(listed - set(header)):
            problems.append(f"{SAFETENSORS_INDEX}: tensor {name!r} is listed in {file} but that file does not hold it")
            complete = False
        for name in sorted(set(header) - listed):
            elsewhere = weight_map.get(name)
            if elsewhere is None:
                problems.append(f"{file}: holds tensor {name!r}, which {SAFETENSORS_INDEX} does not list")
            else:
                problems.append(f"{file}: holds tensor {name!r}, which {SAFETENSORS_INDEX} places in {elsewhere}")
        for name in listed & set(header):
            tensors[name] = header[name]
    for name in on_disk:
        if name not in by_file:
            problems.append(f"{name}: a .safetensors file that {SAFETENSORS_INDEX} does not list")
    return tensors if complete else None


# --- config vs tensors ---------------------------------------------------------------------------------------------
def _check_quantization(config: dict, tensors: dict[str, TensorInfo], problems: list[str]) -> None:
    from .formats import QUANT_CONFIG_VERSION, QUANT_METHOD, check_module_entry, format_params, get_format

    qc = config.get("quantization_config")
    packed_looking = {n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in _PACKED_SUFFIXES}
    if qc is None:
        if packed_looking:
            example = sorted(packed_looking)[0]
            problems.append(
                f"config.json has no quantization_config, but {len(packed_looking)} module(s) store packed tensors"
                f" (e.g. {example}.qweight)"
            )
        return
    if not isinstance(qc, dict):
        problems.append("config.json: quantization_config is not an object")
        return
    if qc.get("quant_method") != QUANT_METHOD:
        return  # another library's format: not ours to check
    if qc.get("version", 1) != QUANT_CONFIG_VERSION:
        problems.append(
            f"config.json: quantization_config version {qc.get('version')!r} is not supported (supported:"
            f" {QUANT_CONFIG_VERSION})"
        )
        return
    modules = qc.get("modules")
    if not isinstance(modules, dict):
        problems.append("config.json: quantization_config.modules is missing or not an object")
        return

    by_module: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        if "." in name:
            module, suffix = name.rsplit(".", 1)
            by_module.setdefault(module, {})[suffix] = info

    for module in sorted(modules):
        entry = modules[module]
        where = f"config.json: module {module!r}"
        try:
            entry = check_module_entry(module, entry)
            params = format_params(entry)
            specs = get_format(entry["format"]).tensor_specs(params, torch.float16)
        except CheckpointError as e:
            problems.append(f"config.json: {e}")
            continue
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{where}: bad {entry.get('format')!r} parameters ({_one_line(e)})")
            continue
        present = by_module.get(module, {})
        for suffix, (shape, dtype) in specs.items():
            info = present.get(suffix)
            if info is None:
                problems.append(f"{where} ({entry['format']}): tensor {module}.{suffix} is missing")
                continue
            if tuple(info.shape) != tuple(shape):
                problems.append(
                    f"{where} ({entry['format']}): {module}.{suffix} has shape {list(info.shape)}, the config implies"
                    f" {list(shape)}"
                )
            if dtype.is_floating_point:
                if not info.dtype.is_floating_point:
                    problems.append(f"{where}: {module}.{suffix} is {_dt(info.dtype)}, expected a floating point dtype")
            elif info.dtype != dtype:
                problems.append(f"{where}: {module}.{suffix} is {_dt(info.dtype)}, expected {_dt(dtype)}")
        if "weight" in present:
            problems.append(f"{where}: {module}.weight is still stored beside the packed tensors")
        bias = present.get("bias")
        if bias is not None and tuple(bias.shape) != (entry["out_features"],):
            problems.append(f"{where}: {module}.bias has shape {list(bias.shape)}, expected [{entry['out_features']}]")
        extra = sorted(set(present) - set(specs) - {"bias", "weight"})
        for suffix in extra:
            problems.append(f"{where}: unexpected tensor {module}.{suffix} (format stores {', '.join(specs)})")

    orphans = sorted(packed_looking - set(modules))
    for module in orphans[:MAX_LISTED]:
        problems.append(f"{module}: stores packed tensors but has no entry in quantization_config.modules")
    if len(orphans) > MAX_LISTED:
        problems.append(f"... and {len(orphans) - MAX_LISTED} more modules with packed tensors but no entry")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
