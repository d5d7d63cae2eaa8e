"""DeepShape: rank-preserving remap onto a target generalized Gaussian; the pass in a recipe and on a live model."""

from __future__ import annotations

import pytest
import torch

import bitsmith
from bitsmith.compress.errors import RecipeError
from bitsmith.compress.passes import TensorState
from bitsmith.compress.recipe import parse_recipe
from bitsmith.prune import deepshape as DS
from bitsmith.prune import distribution as D


def recipe(*passes: str):
    return parse_recipe("version: 1\npasses:\n" + "".join(f"  - {p}\n" for p in passes))


def gg_sample(n, nu, beta, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch._standard_gamma(torch.full((n,), 1.0 / nu, dtype=torch.float64), generator=g)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return sign * beta * z ** (1.0 / nu)


def is_rank_preserving(before: torch.Tensor, after: torch.Tensor) -> bool:
    b, a = before.reshape(-1).double(), after.reshape(-1).double()
    order = torch.argsort(b, stable=True)
    bs, as_ = b[order], a[order]
    nondecreasing = bool((as_[1:] >= as_[:-1]).all())
    ties_kept = bool(((bs[1:] == bs[:-1]) <= (as_[1:] == as_[:-1])).all())
    return nondecreasing and ties_kept


def test_remap_hits_the_target_shape_and_scale():
    w = gg_sample(60_000, 1.6, 0.03).float().reshape(200, 300)
    out, facts = DS.reshape_tensor(w, DS.DeepShape())
    fit0, fit1 = D.fit_gg(w), D.fit_gg(out)
    assert fit1.nu == pytest.approx(0.8 * fit0.nu, rel=0.02)
    assert fit1.beta == pytest.approx(0.6 * fit0.beta, rel=0.02)
    assert facts["nu_target"] == pytest.approx(0.8 * facts["nu"], rel=1e-3)
    assert is_rank_preserving(w, out)
    assert out.shape == w.shape and out.dtype == w.dtype
    # the values are exactly the target quantiles: the empirical CDF matches the target's (KS small)
    assert D.ks_distance(out, D.GGFit(fit0.mu, facts["nu_target"], facts["beta_target"], 0, 0)) < 1e-3


def test_bf16_ties_stay_tied_and_deterministic():
    w = (torch.randn(64, 96, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    a, _ = DS.reshape_tensor(w, DS.DeepShape())
    b, _ = DS.reshape_tensor(w.clone(), DS.DeepShape())
    assert a.dtype == torch.bfloat16
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert is_rank_preserving(w, a)
    assert len(torch.unique(a)) <= len(torch.unique(w))
    assert not torch.equal(a, w)


def test_one_dim_zeros_and_constants():
    v = torch.linspace(-1, 1, 101)
    v[::10] = 0.0
    out, facts = DS.reshape_tensor(v, DS.DeepShape(shape_scale=0.5, std_scale=1.0))
    assert torch.equal(out[::10], torch.zeros(11))
    assert bool((out[v != 0] != 0).all()) and is_rank_preserving(v, out)
    same, facts = DS.reshape_tensor(torch.full((10,), 0.5), DS.DeepShape())
    assert torch.equal(same, torch.full((10,), 0.5)) and "skipped" in facts
    # keep_zeros off: zeros are ranked like any value (the median of a symmetric set maps to mu)
    out2, _ = DS.reshape_tensor(v, DS.DeepShape(keep_zeros=False))
    assert is_rank_preserving(v, out2)


def test_scale_of_std_keeps_the_spread():
    w = gg_sample(40_000, 1.2, 0.05, seed=3).float()
    out, facts = DS.reshape_tensor(w, DS.DeepShape(shape_scale=0.7, std_scale=1.0, scale_of="std"))
    assert facts["std_after"] == pytest.approx(facts["std_before"], rel=0.02)
    assert D.fit_gg(out).nu == pytest.approx(0.7 * D.fit_gg(w).nu, rel=0.03)


def test_shared_fit_keeps_relative_scales():
    a = gg_sample(20_000, 1.5, 0.01, seed=4).float().reshape(100, 200)
    b = gg_sample(20_000, 1.5, 0.03, seed=5).float().reshape(100, 200) + 0.002
    cfg = DS.DeepShape(share_fit="all")
    out = DS.reshape_tensors({"x.0.w": a, "x.1.w": b}, cfg)
    assert is_rank_preserving(a, out["x.0.w"]) and is_rank_preserving(b, out["x.1.w"])
    assert out["x.1.w"].std() > 2 * out["x.0.w"].std()
    assert float(out["x.1.w"].mean()) == pytest.approx(0.002, abs=1e-3)  # each keeps its own centre
    pooled = DS.group_fit([DS.tensor_sketch(a, True), DS.tensor_sketch(b, True)]).fit
    after = D.fit_moments(D.tensor_moments(out["x.0.w"]) + D.tensor_moments(out["x.1.w"]))
    assert after.nu == pytest.approx(0.8 * pooled.nu, rel=0.05)
    assert after.beta == pytest.approx(0.6 * pooled.beta, rel=0.05)
    own = DS.reshape_tensors({"x.0.w": a, "x.1.w": b}, DS.DeepShape())
    assert not torch.equal(own["x.0.w"], out["x.0.w"])  # the group's ranks, not the tensor's own


def test_group_keys():
    assert DS.group_of("model.layers.3.mlp.down_proj.weight", "type") == "model.layers.*.mlp.down_proj.weight"
    assert DS.group_of("model.layers.3.mlp.down_proj.weight", "all") == "all"
    assert D.layer_type("model.layers.12.self_attn.q_proj.weight") == "self_attn.q_proj"


def test_recipe_changes_targets_only(tiny_lm, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ds"
    bitsmith.compress(recipe("{type: deepshape, targets: [re:.*mlp.*]}"), tiny_lm, out, progress=False)
    before, after = load_file(tiny_lm / "model.safetensors"), load_file(out / "model.safetensors")
    for name, t in before.items():
        if ".mlp." in name:
            expect, _ = DS.reshape_tensor(t, DS.DeepShape())
            assert torch.equal(after[name], expect), name
            assert not torch.equal(after[name], t)
        else:
            assert torch.equal(after[name], t), name


def test_recipe_shared_fit_matches_in_memory(tiny_lm, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ds-type"
    bitsmith.compress(recipe("{type: deepshape, share_fit: type}"), tiny_lm, out, progress=False)
    before, after = load_file(tiny_lm / "model.safetensors"), load_file(out / "model.safetensors")
    targets = {n: t for n, t in before.items() if "proj" in n}
    expect = DS.reshape_tensors(targets, DS.DeepShape(share_fit="type"))
    for n in targets:
        assert torch.equal(after[n], expect[n]), n
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])


def test_live_model_and_errors(tiny_lm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    bitsmith.apply(model, [DS.DeepShape(std_scale=0.9)])
    expect, _ = DS.reshape_tensor(w, DS.DeepShape(std_scale=0.9))
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, expect)
    with pytest.raises(RecipeError, match="share_fit"):
        DS.apply_deepshape(DS.DeepShape(share_fit="all"), TensorState("a.weight", w), None)
    with pytest.raises(RecipeError):
        recipe("{type: deepshape, shape_scale: 0}")
    with pytest.raises(RecipeError):
        recipe("{type: deepshape, share_fit: layer}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    w = (torch.randn(128, 256) * 0.02).bfloat16()
    a, _ = DS.reshape_tensor(w, DS.DeepShape())
    b, _ = DS.reshape_tensor(w.cuda(), DS.DeepShape())
    assert b.device.type == "cuda"
    assert (a.float() - b.cpu().float()).abs().max() <= 1e-2 * float(a.float().abs().max())


def test_bundled_deepshape_w4_recipe(tiny_lm, tmp_path):
    import json

    from bitsmith.compress.recipe import load_recipe

    r = load_recipe("deepshape-w4")
    assert [p.type for p in r.passes] == ["deepshape", "finequant"]
    out = tmp_path / "dsw4"
    bitsmith.compress(r, tiny_lm, out, progress=False)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 14 and all(m["format"] == "gwint" and m["bits"] == 4 for m in modules.values())


def test_gg_prior_penalty_value_and_gradient():
    from bitsmith.prune.recover import Recover, gg_penalty, gg_prior_terms

    w = torch.nn.Parameter(gg_sample(20_000, 1.3, 0.02, seed=9).float().reshape(100, 200))
    prior = gg_prior_terms({"w": w}, Recover(gg_prior=1.0))
    mu, nu, beta = prior["w"]
    assert nu == pytest.approx(1.3, rel=0.05) and beta == pytest.approx(0.02, rel=0.05)
    pen = gg_penalty({"w": w}, prior)
    expect = (((w.detach().double() - mu).abs() + 1e-3 * beta) / beta).pow(nu).mean()
    assert float(pen.detach()) == pytest.approx(float(expect), rel=1e-5)
    assert float(pen.detach()) == pytest.approx(1 / nu, rel=0.05)  # E|z|^nu = 1/nu under GG(nu)
    pen.backward()
    assert bool((torch.sign(w.grad) == torch.sign(w.detach() - mu)).float().mean() > 0.99)  # pulls toward mu
    fixed = gg_prior_terms({"w": w}, Recover(gg_prior=1.0, gg_shape=0.5))
    assert fixed["w"][1] == 0.5


def test_recover_with_gg_prior_shrinks_weights(tiny_lm, calib_text):
    from transformers import AutoModelForCausalLM

    from bitsmith.prune.recover import Recover

    def run(gg):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
        bitsmith.apply(model, [DS.DeepShape(), Recover(steps=3, lr=1e-3, text=str(calib_text), teacher=str(tiny_lm),
                                                       samples=4, seq_len=32, batch_size=2, micro_batch=2,
                                                       gg_prior=gg)])
        return model.model.layers[0].mlp.up_proj.weight.detach().clone()

    plain, prior = run(0.0), run(10.0)
    assert not torch.equal(plain, prior)
    assert float(prior.abs().mean()) < float(plain.abs().mean())
