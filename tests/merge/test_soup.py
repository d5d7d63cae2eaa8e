"""soup pass on tiny Llamas built in-test: exact means, validation errors, greedy decisions, learned soups."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import bitsmith
from bitsmith.compress.errors import PlanError, RecipeError
from bitsmith.compress.recipe import load_recipe, parse_recipe
from bitsmith.merge import mixing
from bitsmith.merge.learned import fit_learned_soup, groups_of, token_windows
from tests.conftest import folder_digest, make_tiny_llama

WORDS = [f"w{i}" for i in range(120)]
TEXT = " ".join(WORDS[(i * 7) % 13] for i in range(600))  # a short repeating pattern a tiny model can learn


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _with_tokenizer(path):
    _tokenizer().save_pretrained(path)
    return path


def _edit(path, fn):
    """Rewrite a folder's model.safetensors through fn(state) -> state."""
    f = path / "model.safetensors"
    save_file(fn(load_file(f)), f, metadata={"format": "pt"})
    return path


def _perturbed(src, dst, seed, scale=0.01):
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)

    def noise(state):
        return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in state.items()}

    return _edit(dst, noise)


def _state(path):
    return load_file(path / "model.safetensors")


def _soup(tmp_path, model, lines, out="out", overrides=()):
    text = "version: 1\npasses:\n  - type: soup\n" + "".join(f"    {ln}\n" for ln in lines)
    recipe = parse_recipe(text, "r.yaml", list(overrides))
    bitsmith.compress(recipe, model, tmp_path / out, progress=False)
    return tmp_path / out


# -------------------------------------------------------------------------------------------------- exact means

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_uniform_soup_of_identical_copies_is_bit_identical(tmp_path, dtype):
    src = _with_tokenizer(make_tiny_llama(tmp_path / "m", dtype=dtype))
    copies = []
    for i in range(3):
        shutil.copytree(src, tmp_path / f"c{i}")
        copies.append(str(tmp_path / f"c{i}"))
    before = folder_digest(src)
    out = _soup(tmp_path, src, [f"models: {json.dumps(copies)}", "method: uniform"])
    a, b = _state(src), _state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]), k
    assert folder_digest(src) == before
    report = json.loads((out / "soup_report.json").read_text())
    assert report["method"] == "uniform" and report["models"] == ["c0", "c1", "c2"]  # folder names, no paths


def test_uniform_linear_task_arithmetic_values(tmp_path):
    base = _with_tokenizer(make_tiny_llama(tmp_path / "base"))
    a = _perturbed(base, tmp_path / "a", 1)
    b = _perturbed(base, tmp_path / "b", 2, scale=0.05)
    S, A, B = _state(base), _state(a), _state(b)
    ms = json.dumps([str(a), str(b)])
    out = _state(_soup(tmp_path, base, [f"models: {ms}"], "u"))
    for k in S:
        assert torch.equal(out[k], ((A[k].float() + B[k].float()) / 2).bfloat16()), k
    out = _state(_soup(tmp_path, base, [f"models: {ms}", "method: linear", "weights: [0.25, 0.75]"], "l"))
    for k in S:
        assert torch.equal(out[k], (A[k].float() * 0.25 + B[k].float() * 0.75).bfloat16()), k
    out = _state(_soup(tmp_path, base, [f"models: {ms}", "method: task_arithmetic", "scale: 0.5"], "t"))
    for k in S:
        s = S[k].float()
        assert torch.equal(out[k], (s + 0.5 * ((A[k].float() - s) + (B[k].float() - s))).bfloat16()), k


def test_mixed_dtypes_average_in_float_and_write_the_reference_dtype(tmp_path):
    ref = _with_tokenizer(make_tiny_llama(tmp_path / "ref"))  # bf16
    f32 = _perturbed(ref, tmp_path / "f32", 3)
    _edit(f32, lambda s: {k: v.float() for k, v in s.items()})
    A, B = _state(ref), _state(f32)
    out = _state(_soup(tmp_path, ref, [f"models: {json.dumps([str(ref), str(f32)])}"]))
    for k in A:
        assert out[k].dtype == torch.bfloat16
        assert torch.equal(out[k], ((A[k].double() + B[k].double()) / 2).bfloat16()), k


# ----------------------------------------------------------------------------------------------------- validation

def _fails(tmp_path, ref, other, match):
    with pytest.raises(PlanError, match=match):
        _soup(tmp_path, ref, [f"models: {json.dumps([str(ref), str(other)])}"])
    assert not (tmp_path / "out").exists()


def test_mismatched_models_fail_naming_the_first_difference(tmp_path):
    ref = _with_tokenizer(make_tiny_llama(tmp_path / "ref"))
    wide = _with_tokenizer(make_tiny_llama(tmp_path / "wide", hidden=96))
    _fails(tmp_path, ref, wide, r"models\[1\] \(wide\): config.json head_dim is 24, the reference model's is 16")
    fewer = _perturbed(ref, tmp_path / "fewer", 1)
    _edit(fewer, lambda s: {k: v for k, v in s.items() if k != "model.norm.weight"})
    _fails(tmp_path, ref, fewer, r"models\[1\] \(fewer\): has no tensor 'model.norm.weight'")
    shaped = _perturbed(ref, tmp_path / "shaped", 1)
    _edit(shaped, lambda s: {**s, "model.norm.weight": torch.ones(32, dtype=torch.bfloat16)})
    _fails(tmp_path, ref, shaped, r"tensor 'model.norm.weight' has shape \[32\], the reference model's is \[64\]")
    tok = _perturbed(ref, tmp_path / "tok", 1)
    j = json.loads((tok / "tokenizer.json").read_text())
    j["model"]["vocab"]["w0"], j["model"]["vocab"]["w1"] = j["model"]["vocab"]["w1"], j["model"]["vocab"]["w0"]
    (tok / "tokenizer.json").write_text(json.dumps(j))
    _fails(tmp_path, ref, tok, r"models\[1\] \(tok\): tokenizer file tokenizer.json differs")
    bare = _perturbed(ref, tmp_path / "bare", 1)
    (bare / "tokenizer.json").unlink()
    _fails(tmp_path, ref, bare, r"has no tokenizer file tokenizer.json")


def test_config_errors(tmp_path):
    ref = _with_tokenizer(make_tiny_llama(tmp_path / "ref"))
    bad = [("method: uniform\n    weights: [1, 2]", 5, "weights are for method linear"),
           ("models: [a, b]\n    method: linear\n    weights: [1]", 6, "1 weights for 2 models"),
           ("base: x", 4, "base is for method task_arithmetic"),
           ("eval: t.txt", 4, "eval is used by methods greedy and learned only"),
           ("metod: greedy", 4, "did you mean 'method'")]
    for text, line, msg in bad:
        with pytest.raises(RecipeError, match=f"r.yaml:{line}: .*{msg}"):
            parse_recipe(f"version: 1\npasses:\n  - type: soup\n    {text}\n", "r.yaml")
    with pytest.raises(RecipeError, match="r.yaml:3: .*method linear needs weights"):
        parse_recipe("version: 1\npasses:\n  - type: soup\n    method: linear\n", "r.yaml")
    with pytest.raises(PlanError, match="no models given"):
        _soup(tmp_path, ref, ["method: uniform"])
    with pytest.raises(PlanError, match="needs a held-out measure"):
        _soup(tmp_path, ref, [f"models: [{ref}]", "method: greedy"])
    with pytest.raises(PlanError, match="neither an existing text file nor module:function"):
        _soup(tmp_path, ref, [f"models: [{ref}]", "method: greedy", "eval: no/such/file.txt"])
    with pytest.raises(PlanError, match="cannot import module 'no_such_module_xyz'"):
        _soup(tmp_path, ref, [f"models: [{ref}]", "method: greedy", "eval: 'no_such_module_xyz:f'"])
    with pytest.raises(PlanError, match="first pass"):
        bitsmith.compress(parse_recipe(
            f"version: 1\npasses:\n  - type: finequant\n    bits: 8\n  - type: soup\n    models: [{ref}]\n"),
            ref, tmp_path / "o2", progress=False)


# --------------------------------------------------------------------------------------------------------- greedy

TARGET: dict[str, torch.Tensor] = {}


def distance_to_target(model, tokenizer) -> float:
    """An eval callable for the recipes below: squared distance of the model's weights to TARGET."""
    state = model.state_dict()
    return float(sum(((state[k].double() - v.double()) ** 2).sum() for k, v in TARGET.items()))


def test_greedy_with_a_callable_follows_the_paper_rule(tmp_path):
    target = _with_tokenizer(make_tiny_llama(tmp_path / "target", dtype=torch.float32))
    TARGET.clear()
    TARGET.update(_state(target))
    good = [_perturbed(target, tmp_path / f"g{i}", 10 + i, scale=0.02 * (1 + 0.1 * i)) for i in range(3)]
    far = _perturbed(target, tmp_path / "far", 99, scale=1.0)
    models = [far, good[2], good[0], good[1]]
    out = _soup(tmp_path, target, [f"models: {json.dumps([str(m) for m in models])}", "method: greedy",
                                   "eval: 'tests.merge.test_soup:distance_to_target'"])
    rep = json.loads((out / "soup_report.json").read_text())["greedy"]
    assert rep["order"] == ["g0", "g1", "g2", "far"]  # sorted by score alone, best first
    assert rep["chosen"] == ["g0", "g1", "g2"]  # independent noise averages out; the far model is refused
    assert [d["added"] for d in rep["decisions"]] == [True, True, True, False]
    assert rep["soup_score"] <= min(rep["scores"].values())
    for d in rep["decisions"][1:]:
        assert d["added"] == (d["soup_with"] <= d["soup_before"])
    S = {n: _state(m) for n, m in zip(("g0", "g1", "g2"), good)}
    got = _state(out)
    for k in got:
        mean = (S["g0"][k].double() + S["g1"][k].double() + S["g2"][k].double()) / 3
        assert torch.equal(got[k], mean.float()), k


def _train(path, steps, seed):
    """A tiny Llama trained a few steps on TEXT (so it is far better than chance on it)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([_tokenizer()(TEXT)["input_ids"][:256]]).view(4, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    return path


def test_greedy_on_text_never_worse_than_its_best_ingredient(tmp_path):
    base = _with_tokenizer(make_tiny_llama(tmp_path / "base", dtype=torch.float32))
    ings = []
    for i, steps in enumerate((8, 12, 0)):
        shutil.copytree(base, tmp_path / f"ft{i}")
        ings.append(_train(tmp_path / f"ft{i}", steps, seed=i))
    (tmp_path / "held.txt").write_text(TEXT)
    out = _soup(tmp_path, base, [f"models: {json.dumps([str(m) for m in ings])}", "method: greedy",
                                 f"eval: {tmp_path / 'held.txt'}", "eval_tokens: 300", "eval_window: 64"])
    rep = json.loads((out / "soup_report.json").read_text())
    g = rep["greedy"]
    assert rep["eval"]["text"] == "held.txt" and len(g["decisions"]) == 3
    assert g["scores"]["ft1"] < g["scores"]["ft2"]  # trained beats untrained
    assert g["soup_score"] <= min(g["scores"].values())
    from bitsmith.compress.evaluate import evaluate_path

    measured = evaluate_path(out, tmp_path / "held.txt", max_tokens=300, window=64, device="cpu", progress=False)
    assert measured["ppl"] == pytest.approx(g["soup_score"], rel=1e-6)  # the report scores what was written


# -------------------------------------------------------------------------------------------------------- learned

def test_groups_of_layers_and_tensors():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight",
             "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    g = groups_of(names, "layer")
    assert g["model.layers.0.mlp.up_proj.weight"] == g["model.layers.0.input_layernorm.weight"] == "model.layers.0"
    assert g["model.embed_tokens.weight"] == "model.embed_tokens" and g["model.norm.weight"] == "model.norm"
    assert groups_of(names, "tensor") == {n: n for n in names}


def test_learned_soup_prefers_the_trained_model(tmp_path):
    base = _with_tokenizer(make_tiny_llama(tmp_path / "base", dtype=torch.float32))
    shutil.copytree(base, tmp_path / "ft")
    ft = _train(tmp_path / "ft", 15, seed=0)
    names = list(_state(base))
    getters = [_state(ft).get, _state(base).get]
    model = mixing.build_model(json.loads((base / "config.json").read_text()))
    windows = token_windows(_tokenizer(), TEXT, 64, None)
    res = fit_learned_soup(model, names, getters, windows, steps=12, lr=0.2, batch_size=2, log=lambda m: None)
    assert res.losses[-1] < res.losses[0]
    for w in res.weights.values():
        assert sum(w) == pytest.approx(1.0)
    assert sum(w[0] for w in res.weights.values()) / len(res.weights) > 0.5


def test_learned_soup_pass_writes_the_reported_mixture(tmp_path):
    base = _with_tokenizer(make_tiny_llama(tmp_path / "base"))
    a = _perturbed(base, tmp_path / "a", 1, scale=0.05)
    b = _perturbed(base, tmp_path / "b", 2, scale=0.05)
    (tmp_path / "held.txt").write_text(TEXT)
    out = _soup(tmp_path, base, [f"models: {json.dumps([str(a), str(b)])}", "method: learned",
                                 f"eval: {tmp_path / 'held.txt'}", "eval_window: 64", "steps: 2",
                                 "granularity: tensor"])
    rep = json.loads((out / "soup_report.json").read_text())["learned"]
    A, B, got = _state(a), _state(b), _state(out)
    assert set(rep["weights"]) == set(got)
    for k in got:
        wa, wb = rep["weights"][k]["a"], rep["weights"][k]["b"]
        expect = mixing.weighted_sum([A.get, B.get], k, [wa, wb], torch.bfloat16)
        assert torch.equal(got[k], expect), k


# -------------------------------------------------------------------------------------------------------- recipes

def test_bundled_soup_greedy_recipe(tmp_path):
    ref = _with_tokenizer(make_tiny_llama(tmp_path / "ref"))
    (tmp_path / "held.txt").write_text(TEXT)
    r = load_recipe("soup-greedy", [f"models=[{ref}, {ref}]", f"eval={tmp_path / 'held.txt'}"])
    assert r.passes[0].method == "greedy" and len(r.passes[0].models) == 2
    with pytest.raises(PlanError, match="no models given"):
        bitsmith.compress("soup-greedy", ref, tmp_path / "o", progress=False)
