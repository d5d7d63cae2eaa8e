"""transplant_tokenizer on tiny models: two tokenizer families built in-test, tied and untied, baselines, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitsmith
from bitsmith.compress.errors import CheckpointError, PlanError
from bitsmith.compress.recipe import load_recipe, parse_recipe
from bitsmith.tokenizers.vocab import load_vocab, tokenizer_files
from tests.conftest import folder_digest, make_tiny_llama

WORDS = ("the quick brown fox jumps over lazy dog it was best of times worst she said answer is forty two "
         "apples pears there were in and a garden morning family children mother father gate weather price corn "
         "news town nobody hurry time enough work afternoon").split()
CORPUS = [" ".join(WORDS[(i * i * 7 + j * j * 3 + i * j) % len(WORDS)] for j in range(15)) + f" {i * 37} {1811 + i}.\n"
          for i in range(300)]


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok, dict(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                     unk_token="<|endoftext|>")


def _metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok, dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def _model(path, kind: str, *, tie: bool, hidden: int, seed: int):
    """A tiny float32 Llama whose vocabulary is the tokenizer's, with the tokenizer saved beside it."""
    from transformers import PreTrainedTokenizerFast

    tok, special = _byte_level_tokenizer() if kind == "byte_level" else _metaspace_tokenizer()
    make_tiny_llama(path, tie=tie, dtype=torch.float32, seed=seed, hidden=hidden, intermediate=hidden * 2,
                    vocab=tok.get_vocab_size())
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update({"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id})
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id, "pad_token_id": hf.pad_token_id,
         "max_new_tokens": 7}))
    return path


def _recipe(**kw) -> str:
    lines = ["version: 1", "passes:", "  - type: transplant_tokenizer"]
    lines += [f"    {k}: {json.dumps(v)}" for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def _vocab(path):
    return load_vocab(tokenizer_files(path), json.loads((path / "config.json").read_text()), str(path))


def _rows(path, name="model.embed_tokens.weight"):
    return load_file(path / "model.safetensors")[name]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return {
        "bl_tied": _model(root / "bl-tied", "byte_level", tie=True, hidden=64, seed=1),
        "ms_untied": _model(root / "ms-untied", "metaspace", tie=False, hidden=48, seed=2),
    }


def test_vocab_keys_normalise_both_families(pair):
    bl, ms = _vocab(pair["bl_tied"]), _vocab(pair["ms_untied"])
    assert (bl.family, ms.family) == ("byte_level", "metaspace")
    for vocab, marker in ((bl, "Ġ"), (ms, "▁")):  # word-start markers become a space
        words = [t for t in vocab.tokens if t and t.startswith(marker) and len(t) > 2]
        assert words
        for t in words:
            assert vocab.keys[vocab.tokenizer.token_to_id(t)] == b" " + t[1:].encode()
    assert bl.keys[bl.tokenizer.token_to_id("Ċ")] == b"\n"  # a byte-level byte
    assert bl.roles == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert ms.roles == {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
    shared = set(bl.index()) & set(ms.index())
    assert any(k.startswith(b" ") and len(k) > 3 for k in shared)
    # special tokens only ever match special tokens of the same text
    assert not any(bl.is_special_key(k) for k in shared)


def _check_folder(out, base, donor, *, tied: bool):
    cfg = json.loads((out / "config.json").read_text())
    dcfg = json.loads((donor / "config.json").read_text())
    dv = _vocab(donor)
    assert cfg["vocab_size"] == dv.size == dcfg["vocab_size"]
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == dcfg[key]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == dcfg["eos_token_id"] and gen["max_new_tokens"] == 7  # base's settings, donor's ids
    assert (out / "tokenizer.json").read_bytes() == (donor / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").read_bytes() == (donor / "tokenizer_config.json").read_bytes()
    tensors = load_file(out / "model.safetensors")
    assert ("lm_head.weight" not in tensors) == tied
    assert cfg.get("tie_word_embeddings", False) == tied
    base_t = load_file(base / "model.safetensors")
    for name, t in base_t.items():  # every other tensor streams through untouched
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(tensors[name], t), name
    report = json.loads((out / "transplant_report.json").read_text())
    assert report["copied"] + report["rebuilt"] + report["special_mapped"] + report["filled_mean"] == dv.size
    assert report["copied"] > 20 and report["rebuilt"] > 20 and report["special_mapped"] >= 3
    return tensors, base_t, report


@pytest.mark.parametrize("direction", ["into_tied", "into_untied"])
def test_transplant_folder_rows_and_roles(pair, tmp_path, direction):
    base, donor = ((pair["bl_tied"], pair["ms_untied"]) if direction == "into_tied"
                   else (pair["ms_untied"], pair["bl_tied"]))
    tied = direction == "into_tied"
    before = folder_digest(base), folder_digest(donor)
    out = tmp_path / "out"
    bitsmith.compress(parse_recipe(_recipe(donor=str(donor), k=8, candidates=None)), base, out, progress=False)
    assert (folder_digest(base), folder_digest(donor)) == before
    tensors, base_t, report = _check_folder(out, base, donor, tied=tied)
    bv, dv = _vocab(base), _vocab(donor)
    bidx = bv.index()
    names = ["model.embed_tokens.weight"] + ([] if tied else ["lm_head.weight"])
    for name in names:
        new, old = tensors[name], base_t[name]
        for key, i in dv.index().items():  # shared tokens: the base's rows, exactly
            if key in bidx and not dv.is_special_key(key) and i not in dv.roles.values():
                assert torch.equal(new[i], old[bidx[key]]), (name, key)
        for role in ("bos", "eos", "unk"):  # special tokens by role
            assert torch.equal(new[dv.roles[role]], old[bv.roles[role]]), (name, role)
    if not tied:  # the head was rebuilt from its own rows, not the embedding's
        assert not torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert set(report["special"]) >= {"bos", "eos", "unk"}


def test_omp_rows_are_the_donor_combination(pair, tmp_path):
    """A new token whose donor row is 0.5 a + 2 b (a, b shared) gets 0.5 A + 2 B from the base's rows of a and b."""
    base, donor_src = pair["bl_tied"], pair["ms_untied"]
    donor = tmp_path / "donor"
    shutil.copytree(donor_src, donor)
    bv, dv = _vocab(base), _vocab(donor)
    bidx, didx = bv.index(), dv.index()
    shared = [k for k in didx if k in bidx and not dv.is_special_key(k) and didx[k] not in dv.roles.values()]
    new = [i for i, k in enumerate(dv.keys) if k is not None and k not in bidx and not dv.is_special_key(k)]
    a, b, target = shared[3], shared[11], new[0]
    state = load_file(donor / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = state[name]
        w[target] = 0.5 * w[didx[a]] + 2.0 * w[didx[b]]
    save_file(state, donor / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    bitsmith.compress(parse_recipe(_recipe(donor=str(donor), k=4, candidates=None)), base, out, progress=False)
    got = _rows(out)[target]
    B = _rows(base)
    want = 0.5 * B[bidx[a]] + 2.0 * B[bidx[b]]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_baselines(pair, tmp_path):
    base, donor = pair["ms_untied"], pair["bl_tied"]
    bv, dv = _vocab(base), _vocab(donor)
    bidx = bv.index()
    B = _rows(base)
    new_ids = [i for i, k in enumerate(dv.keys) if k is not None and k not in bidx and not dv.is_special_key(k)]
    rows = {}
    for method in ("mean", "zero", "subword"):
        out = tmp_path / method
        bitsmith.compress(parse_recipe(_recipe(donor=str(donor), method=method)), base, out, progress=False)
        rows[method] = _rows(out)
        assert json.loads((out / "transplant_report.json").read_text())["method"] == method
    keep = [i for i in range(B.shape[0]) if i not in bv.special]
    assert torch.allclose(rows["mean"][new_ids], B[keep].mean(0).expand(len(new_ids), -1), atol=1e-6)
    assert torch.equal(rows["zero"][new_ids], torch.zeros(len(new_ids), B.shape[1]))
    i = next(i for i in new_ids if len(dv.text_of(i)) > 3)
    pieces = bv.tokenizer.encode(dv.text_of(i).decode(), add_special_tokens=False).ids
    assert len(pieces) > 1
    assert torch.allclose(rows["subword"][i], B[pieces].mean(0), atol=1e-6)


def test_output_loads_with_plain_transformers_and_generates(pair, tmp_path):
    out = tmp_path / "out"
    bitsmith.compress("transplant-omp", pair["ms_untied"], out, overrides=[f"donor={pair['bl_tied']}"],
                      progress=False)
    script = (
        "import sys, transformers\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "x = t('the quick brown fox 1811', return_tensors='pt')\n"
        "y = m.generate(**x, max_new_tokens=5, do_sample=False, min_new_tokens=5)\n"
        "assert y.shape[1] == x['input_ids'].shape[1] + 5\n"
        "assert 'bitsmith' not in sys.modules\n"
        "print(len(t), m.config.vocab_size)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    n_tok, n_vocab = map(int, res.stdout.split()[-2:])
    assert n_tok == n_vocab == _vocab(pair["bl_tied"]).size


def test_bundled_recipe_and_missing_donor(pair, tmp_path):
    recipe = load_recipe("transplant-omp", [f"donor={pair['bl_tied']}"])
    assert recipe.passes[0].donor == str(pair["bl_tied"]) and recipe.passes[0].method == "omp"
    with pytest.raises(PlanError, match="no donor given"):
        bitsmith.compress("transplant-omp", pair["ms_untied"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _no_output(tmp_path):
    return not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_donor_without_tokenizer(pair, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(pair["bl_tied"], donor)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (donor / f).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="no tokenizer"):
        bitsmith.compress(parse_recipe(_recipe(donor=str(donor))), pair["ms_untied"], tmp_path / "out",
                          progress=False)
    assert _no_output(tmp_path)


def test_donor_without_embedding_width(pair, tmp_path):
    donor = tmp_path / "donor"
    shutil.copytree(pair["bl_tied"], donor)
    cfg = json.loads((donor / "config.json").read_text())
    del cfg["hidden_size"]
    (donor / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="embedding width"):
        bitsmith.compress(parse_recipe(_recipe(donor=str(donor))), pair["ms_untied"], tmp_path / "out",
                          progress=False)
    assert _no_output(tmp_path)


def test_base_without_embedding_tensor(pair, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(pair["ms_untied"], base)
    state = load_file(base / "model.safetensors")
    del state["model.embed_tokens.weight"]
    save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PlanError, match="no input embedding tensor"):
        bitsmith.compress(parse_recipe(_recipe(donor=str(pair["bl_tied"]))), base, tmp_path / "out", progress=False)
    assert _no_output(tmp_path)


def test_token_map_and_shared_role_token(pair, tmp_path):
    """token_map copies named rows; a donor token with two roles (pad = eos) is mapped once and reported as such."""
    base, donor = pair["ms_untied"], pair["bl_tied"]
    out = tmp_path / "out"
    bitsmith.compress(parse_recipe(_recipe(donor=str(donor), method="zero",
                                           token_map={"<|im_start|>": "<eos>", "<|endoftext|>": "<pad>"})),
                      base, out, progress=False)
    bv, dv = _vocab(base), _vocab(donor)
    new, old = _rows(out), _rows(base)
    assert torch.equal(new[dv.tokenizer.token_to_id("<|im_start|>")], old[bv.tokenizer.token_to_id("<eos>")])
    assert torch.equal(new[dv.tokenizer.token_to_id("<|endoftext|>")], old[bv.tokenizer.token_to_id("<pad>")])
    report = json.loads((out / "transplant_report.json").read_text())
    assert report["token_map"] == 2 and report["special"]["pad"]["same_as"] == "eos"
    assert report["special"]["bos"]["note"] == "set by token_map" and report["special_mapped"] == 1  # eos only
    assert report["copied"] + report["rebuilt"] + 1 + 2 + report["filled_mean"] == dv.size
    with pytest.raises(PlanError, match="not a token of the donor"):
        bitsmith.compress(parse_recipe(_recipe(donor=str(donor), token_map={"<nope>": "<eos>"})), base,
                          tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("case", ["donor_without_tokenizer", "donor_without_width", "base_without_embedding"])
def test_bad_input_on_the_command_line(pair, tmp_path, case):
    """`bitsmith compress transplant-omp BASE -o OUT --set donor=DIR`: exit 2, one message naming the problem, and
    nothing written (no output folder, no temporary folder beside it)."""
    from click.testing import CliRunner

    from bitsmith.cli import main

    base, donor = pair["ms_untied"], pair["bl_tied"]
    if case == "base_without_embedding":
        base = tmp_path / "base"
        shutil.copytree(pair["ms_untied"], base)
        state = load_file(base / "model.safetensors")
        del state["model.embed_tokens.weight"]
        save_file(state, base / "model.safetensors", metadata={"format": "pt"})
    else:
        donor = tmp_path / "donor"
        shutil.copytree(pair["bl_tied"], donor)
        if case == "donor_without_tokenizer":
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                (donor / f).unlink(missing_ok=True)
        else:
            cfg = json.loads((donor / "config.json").read_text())
            del cfg["hidden_size"]
            (donor / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["compress", "transplant-omp", str(base), "-o", str(tmp_path / "out"),
                                  "--set", f"donor={donor}", "--no-progress"])
    want = {"donor_without_tokenizer": "no tokenizer", "donor_without_width": "embedding width",
            "base_without_embedding": "no input embedding tensor"}[case]
    assert r.exit_code == 2, r.output
    assert want in r.output and "Traceback" not in r.output
    assert _no_output(tmp_path)
