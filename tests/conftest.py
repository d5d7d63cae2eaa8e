"""Shared fixtures: tiny real Hugging Face checkpoints built on the spot (no downloads)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch


def make_tiny_llama(path: Path, *, tie: bool = False, dtype=torch.bfloat16, seed: int = 0, shard_size=None,
                    hidden: int = 64, intermediate: int = 96, layers: int = 2, vocab: int = 128) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def folder_digest(path: Path) -> str:
    """A hash of every file's name and bytes under a folder (to prove it was not modified)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny_llama(tmp_path / "tiny-llama")


@pytest.fixture
def tiny_llama_tied(tmp_path) -> Path:
    return make_tiny_llama(tmp_path / "tiny-llama-tied", tie=True)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (real example models)")


def pytest_collection_modifyitems(config, items):
    import os

    if config.getoption("--run-slow") or os.environ.get("BITSMITH_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: real example models; run with --run-slow or BITSMITH_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
