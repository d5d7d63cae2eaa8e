"""Per-layer bit widths in a recipe: `bits: 3`, or `bits: {default: 3, "re:.*down_proj": 4, "v_proj": 4}`.

A mapping needs a `default`; every other key is a module pattern with the same meaning as in `targets`: a class name
(the module's class or a base class), a module-name suffix (`down_proj`, `lm_head`), or `re:<regex>` matched against
the whole module name. Keys are tried in the order written and the first that matches decides; `default` covers the
rest. Any quantizer with a `bits` field can reuse this: declare the field as `BitsSpec`, validate it with
`validate_bits(value, allowed)` in a pydantic validator, call `check_patterns` in the pass's plan (a key that matches
none of the pass's modules is a PlanError listing such keys), and `bits_for` in its apply.
"""

from __future__ import annotations

import logging
import re
from typing import Iterable, Union

from ..compress.errors import PlanError

BitsSpec = Union[int, dict[str, int]]

DEFAULT_KEY = "default"
log = logging.getLogger("bitsmith")


def validate_bits(value: object, allowed: Iterable[int]) -> BitsSpec:
    """Check a `bits` value (int or {pattern: int} with `default`); raises ValueError (pydantic turns it into a
    RecipeError with the YAML line)."""
    allowed = tuple(allowed)
    span = f"{min(allowed)}..{max(allowed)}" if list(allowed) == list(range(min(allowed), max(allowed) + 1)) \
        else ", ".join(map(str, allowed))

    def one(v: object, where: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v not in allowed:
            raise ValueError(f"{where}: bit width must be an integer in {span}, got {v!r}")
        return v

    if isinstance(value, dict):
        if DEFAULT_KEY not in value:
            raise ValueError(f"a per-layer bits mapping needs a 'default' key (got keys {list(value)}); e.g."
                             " {default: 3, 're:.*down_proj': 4}")
        out: dict[str, int] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"bits keys must be module patterns (strings), got {k!r}")
            if k.startswith("re:"):
                try:
                    re.compile(k[3:])
                except re.error as e:
                    raise ValueError(f"bits[{k!r}]: bad regular expression: {e}") from None
            out[k] = one(v, f"bits[{k!r}]")
        return out
    return one(value, "bits")


def _matches(pattern: str, name: str, class_names: Iterable[str]) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern in tuple(class_names) or name == pattern or name.endswith("." + pattern)


def bits_for(spec: BitsSpec, module: str | None, class_names: Iterable[str] = ()) -> int:
    """The bit width of one module under `spec` (first matching key in order, else `default`)."""
    if isinstance(spec, int):
        return spec
    for key, bits in spec.items():
        if key != DEFAULT_KEY and module is not None and _matches(key, module, class_names):
            return bits
    return spec[DEFAULT_KEY]


def check_patterns(spec: BitsSpec, modules, where: str = "bits") -> None:
    """PlanError when a per-layer key matches none of `modules` (ModuleInfo-like: .name, .class_names)."""
    if isinstance(spec, int):
        return
    dead = [k for k in spec if k != DEFAULT_KEY
            and not any(_matches(k, m.name, m.class_names) for m in modules)]
    if dead:
        names = [m.name for m in modules]
        raise PlanError(
            f"{where}: bits keys {', '.join(repr(k) for k in dead)} match none of the {len(names)} modules this pass"
            f" quantizes (e.g. {', '.join(names[:4])}); use a class name, a name suffix like 'down_proj', or"
            " 're:<regex>' matched against the whole module name"
        )


def bits_by_module(spec: BitsSpec, modules) -> dict[str, int]:
    return {m.name: bits_for(spec, m.name, m.class_names) for m in modules}


def average_bits(spec: BitsSpec, modules, overhead=None) -> float:
    """Weighted (by weight count) average of bits per weight over `modules` with a known shape.

    `overhead(bits, in_features) -> float` adds the stored extras per weight (scales, alphas) of one module.
    """
    total = weights = 0.0
    for m in modules:
        if not m.shape or len(m.shape) != 2:
            continue
        n = m.shape[0] * m.shape[1]
        b = bits_for(spec, m.name, m.class_names)
        total += n * (b + (overhead(b, m.shape[1]) if overhead else 0.0))
        weights += n
    return total / weights if weights else 0.0


def describe(spec: BitsSpec, modules, overhead=None) -> str:
    """One line for the plan: the bit widths used, how many modules each, and the average bits per weight."""
    per = bits_by_module(spec, modules)
    counts: dict[int, int] = {}
    for b in per.values():
        counts[b] = counts.get(b, 0) + 1
    widths = ", ".join(f"{b}-bit x{c}" for b, c in sorted(counts.items()))
    line = f"{widths}; average {average_bits(spec, modules):.3f} code bits per weight"
    if overhead is not None:
        line += f", {average_bits(spec, modules, overhead):.3f} stored bits per weight (scales counted)"
    return line
