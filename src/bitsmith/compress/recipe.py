"""Recipes: YAML files of `version`, optional `name`/`description`, and an ordered list `passes:` of `{type: ..., ...}`.

Every error names the file, the line and the key, and lists what is allowed. Bundled recipes live in
`bitsmith/recipes/*.yaml` and can be named instead of a path. Values can be overridden from the command line with
`--set KEY=VALUE` (every pass that has KEY) or `--set passes.N.KEY=VALUE` (one pass), VALUE parsed as YAML.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import RecipeError
from .passes import PassConfig, get_handler, known_passes

RECIPE_VERSION = 1
TOP_LEVEL_KEYS = ("version", "name", "description", "passes")


@dataclass
class Recipe:
    passes: list[PassConfig]
    name: str | None = None
    description: str | None = None
    version: int = RECIPE_VERSION
    source: str = "<recipe>"  # where it came from, for messages
    text: str = ""  # the YAML as written (saved beside the output, with overrides applied)
    overrides: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        body: dict[str, Any] = {"version": self.version}
        if self.name:
            body["name"] = self.name
        if self.description:
            body["description"] = self.description
        body["passes"] = [p.model_dump(mode="json") for p in self.passes]
        return yaml.safe_dump(body, sort_keys=False)


# --- bundled recipes ---------------------------------------------------------------------------------------------

def bundled_recipes() -> dict[str, str]:
    """{name: YAML text} of the recipes shipped in bitsmith/recipes."""
    out = {}
    for entry in resources.files("bitsmith.recipes").iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = entry.read_text()
    return dict(sorted(out.items()))


def recipe_source(name_or_path: str) -> tuple[str, str]:
    """(text, label) for a bundled name or a file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"{name_or_path}: no such recipe file")
        return path.read_text(), str(path)
    bundled = bundled_recipes()
    if name_or_path in bundled:
        return bundled[name_or_path], f"{name_or_path} (bundled)"
    near = difflib.get_close_matches(name_or_path, bundled, n=3)
    hint = f" Did you mean: {', '.join(near)}?" if near else ""
    raise RecipeError(
        f"{name_or_path}: not a recipe file and not a bundled recipe (bundled: {', '.join(bundled)}).{hint}"
    )


# --- YAML with line numbers --------------------------------------------------------------------------------------

def _line_index(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """{key path: 1-based line} for every mapping key and sequence item under node."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            lines[path + (key,)] = k.start_mark.line + 1
            lines.update({p: ln for p, ln in _line_index(v, path + (key,)).items() if p != path + (key,)})
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(_line_index(item, path + (i,)))
    return lines


def _parse_yaml(text: str, label: str) -> tuple[Any, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark else label
        problem = getattr(e, "problem", None) or str(e)
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None:
            problem += f" ({context} at line {cmark.line + 1})"
        raise RecipeError(f"{where}: malformed YAML: {problem}") from None
    return data, (_line_index(node) if node is not None else {})


def _where(label: str, lines: dict[tuple, int], path: tuple) -> str:
    for cut in range(len(path), -1, -1):
        if path[:cut] in lines:
            return f"{label}:{lines[path[:cut]]}"
    return label


def _path_str(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# --- overrides ---------------------------------------------------------------------------------------------------

def apply_overrides(data: dict, overrides: list[str], label: str) -> None:
    passes = data.get("passes")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE or passes.N.KEY=VALUE")
        value = yaml.safe_load(raw) if raw else ""
        parts = key.split(".")
        if parts[0] == "passes" and len(parts) >= 3 and parts[1].isdigit():
            i = int(parts[1])
            if not isinstance(passes, list) or i >= len(passes):
                raise RecipeError(f"--set {item!r}: {label} has no pass number {i} (it has {len(passes or [])})")
            _set_nested(passes[i], parts[2:], value)
        elif parts[0] in TOP_LEVEL_KEYS and len(parts) == 1:
            data[parts[0]] = value
        else:
            hits = [p for p in (passes or []) if isinstance(p, dict) and _accepts(p, parts[0])]
            if not hits:
                raise RecipeError(
                    f"--set {item!r}: no pass in {label} has a key {parts[0]!r}"
                    f" (passes: {', '.join(str(p.get('type')) for p in passes or [] if isinstance(p, dict))})"
                )
            for p in hits:
                _set_nested(p, parts, value)


def _accepts(pass_dict: dict, key: str) -> bool:
    if key in pass_dict:
        return True
    try:
        return key in get_handler(str(pass_dict.get("type"))).config_cls.model_fields
    except RecipeError:
        return False


def _set_nested(d: dict, parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


# --- validation --------------------------------------------------------------------------------------------------

def _format_validation_error(e: ValidationError, cls: type[BaseModel], label: str, lines: dict[tuple, int],
                             base: tuple) -> str:
    msgs = []
    for err in e.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function-"))))
        field_path = base + loc
        where = _where(label, lines, field_path)
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(k for k in cls.model_fields if k != "type")
            near = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            msgs.append(f"{where}: {_path_str(field_path)}: unknown key{hint}; allowed keys: {allowed}")
        else:
            got = err.get("input")
            got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
            msgs.append(f"{where}: {_path_str(field_path)}: {err['msg']}{got_s}")
    return "\n".join(msgs)


def parse_recipe(text: str, label: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    data, lines = _parse_yaml(text, label)
    if data is None:
        raise RecipeError(f"{label}: empty recipe (expected keys: {', '.join(TOP_LEVEL_KEYS)})")
    if not isinstance(data, dict):
        raise RecipeError(f"{label}:1: a recipe is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    if overrides:
        apply_overrides(data, overrides, label)
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            near = difflib.get_close_matches(str(key), TOP_LEVEL_KEYS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RecipeError(f"{_where(label, lines, (key,))}: unknown key {key!r}{hint};"
                              f" allowed: {', '.join(TOP_LEVEL_KEYS)}")
    version = data.get("version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise RecipeError(f"{_where(label, lines, ('version',))}: version: {version!r} is not supported"
                          f" (this bitsmith reads recipe version {RECIPE_VERSION})")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise RecipeError(f"{_where(label, lines, (key,))}: {key}: expected a string")
    raw_passes = data.get("passes")
    if not isinstance(raw_passes, list) or not raw_passes:
        raise RecipeError(f"{_where(label, lines, ('passes',))}: passes: expected a non-empty list of"
                          " {type: ..., ...} mappings")
    configs: list[PassConfig] = []
    for i, raw in enumerate(raw_passes):
        where = _where(label, lines, ("passes", i))
        if not isinstance(raw, dict) or "type" not in raw:
            raise RecipeError(f"{where}: passes[{i}]: expected a mapping with a 'type' key"
                              f" (known types: {', '.join(known_passes())})")
        type_name = raw["type"]
        try:
            handler = get_handler(str(type_name))
        except RecipeError:
            near = difflib.get_close_matches(str(type_name), known_passes(), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise RecipeError(f"{_where(label, lines, ('passes', i, 'type'))}: passes[{i}].type: unknown pass type"
                              f" {type_name!r}{hint}; known: {', '.join(known_passes())}") from None
        try:
            configs.append(handler.config_cls.model_validate(raw))
        except ValidationError as e:
            raise RecipeError(_format_validation_error(e, handler.config_cls, label, lines, ("passes", i))) from None
    return Recipe(passes=configs, name=data.get("name"), description=data.get("description"), version=version,
                  source=label, text=text, overrides=list(overrides or []))


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    text, label = recipe_source(name_or_path)
    return parse_recipe(text, label, overrides)
