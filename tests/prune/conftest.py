"""Fixtures for the pruning tests: a tiny Llama checkpoint with a byte-level tokenizer (built here, no download)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"
        " of a wife. However little known the feelings or views of such a man may be on his first entering a"
        " neighbourhood, this truth is so well fixed in the minds of the surrounding families. ") * 6


def save_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (no merges) saved as a fast tokenizer in `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)


def make_calibrated_llama(path: Path, **kw) -> Path:
    kw.setdefault("vocab", 256)
    make_tiny_llama(path, **kw)
    save_byte_tokenizer(path)
    return path


@pytest.fixture
def tiny_lm(tmp_path) -> Path:
    """hidden 64, intermediate 96, 2 layers, vocab 256, bf16, with a tokenizer."""
    return make_calibrated_llama(tmp_path / "tiny-lm")


@pytest.fixture
def calib_text(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    return p
