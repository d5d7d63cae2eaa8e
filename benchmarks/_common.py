"""Helpers shared by the benchmark scripts. They run as `python benchmarks/NAME.py`, which puts this folder on
sys.path, so they import this module as `_common`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping


def log(msg: str) -> None:
    """Progress to stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


def append_jsonl(path: str | Path | None, row: dict) -> str:
    """Append `row` as one JSON line to `path` (nothing when `path` is None or empty); returns the line."""
    line = json.dumps(row)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
    return line


def print_configs(configs: Mapping[str, object]) -> None:
    """The `--list` output: one configuration name and its spec per line."""
    for name, spec in configs.items():
        print(f"{name:22s} {spec}")


def chosen_configs(ap: argparse.ArgumentParser, spec: str, configs: Mapping[str, object]) -> list[str]:
    """The names in a comma-separated `--configs` value; an unknown name is a usage error (exits)."""
    names = [c for c in spec.split(",") if c]
    unknown = [c for c in names if c not in configs]
    if unknown:
        ap.error(f"unknown configs {unknown}")
    return names


def load_causal_lm(model_arg: str):
    """(model in float32, eval mode; its tokenizer; a short name) from a model folder or an example name
    (`smollm2-135m`, `gemma3-270m`, fetched into the cache if needed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.compress.examples import EXAMPLES, fetch_example

    folder = fetch_example(model_arg, progress=False) if model_arg in EXAMPLES else Path(model_arg)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    name = model_arg if model_arg in EXAMPLES else Path(model_arg).name
    return model, AutoTokenizer.from_pretrained(folder), name
