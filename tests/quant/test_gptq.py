"""rounding: gptq for finequant, bipolar and bcq: lower layer-output error than nearest on the calibration
activations, exact grid membership (what the packed format dequantizes to), partial groups, act_order keeping the
format, the engine path (a packing model pass) on a tiny Llama with a byte tokenizer, and user errors."""

from __future__ import annotations

import json

import pytest
import torch

from bitsmith.api import compress
from bitsmith.compress.errors import PlanError, RecipeError
from bitsmith.compress.formats import get_format
from bitsmith.compress.passes import PassKind, TensorState
from bitsmith.compress.recipe import load_recipe, parse_recipe
from bitsmith.kernels import bitplane, gwint
from bitsmith.quant.bcq import BCQ, apply_bcq
from bitsmith.quant.bipolar import Bipolar, apply_bipolar
from bitsmith.quant.finequant import FineQuant, apply_finequant
from bitsmith.quant.gptq import gptq_quantize, output_error, quantize_with_hessian
from tests.prune.conftest import TEXT, make_calibrated_llama

N, K = 48, 80  # group size 32 -> groups of 32, 32 and a partial 16


def _weight(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[:, torch.randperm(K, generator=g)[:5]] *= 6  # a few outlier columns, like real LLM weights
    return w.to(torch.bfloat16)


def _hessian(seed=1, tokens=512):
    """Correlated inputs with uneven channel scales (what makes error feedback pay)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(12, K, generator=g)
    x = torch.randn(tokens, 12, generator=g) @ basis + 0.3 * torch.randn(tokens, K, generator=g)
    x = x * (torch.rand(K, generator=g) * 3 + 0.2)
    return x.t() @ x


CASES = [
    (apply_finequant, dict(cls=FineQuant, bits=4, group_size=32)),
    (apply_finequant, dict(cls=FineQuant, bits=3, group_size=32, symmetric=False)),
    (apply_bipolar, dict(cls=Bipolar, bits=3, group_size=32)),
    (apply_bcq, dict(cls=BCQ, bits=3, group_size=32, iters=4)),
]


def _cfg(kw, **extra):
    kw = dict(kw)
    return kw.pop("cls")(**kw, **extra)


def _state(w):
    return TensorState("m.weight", w.clone(), "m", "Linear")


def _exact(state):
    """The float32 weight the packed tensors stand for (the formats' exact dequantization)."""
    t, p = state.packed.tensors, state.packed.params
    if state.packed.format == "gwint":
        return gwint.dequantize(t["qweight"], t["scales"], t.get("zeros"), p["bits"], p["group_size"],
                                p["in_features"], dtype=torch.float32)
    coef = t["scales"] if p["kind"] == "bipolar" else t["alphas"]
    return bitplane.dequantize(t["planes"], coef, t.get("offset"), p["kind"], p["group_size"], p["in_features"],
                               dtype=torch.float32)


@pytest.mark.parametrize("apply_fn,kw", CASES, ids=["fq4", "fq3-asym", "bipolar3", "bcq3"])
@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_beats_nearest_on_the_calibration_activations(apply_fn, kw, act_order):
    w, H = _weight(), _hessian()
    near = apply_fn(_cfg(kw), _state(w))
    gq, deq = quantize_with_hessian(_cfg(kw, rounding="gptq", act_order=act_order), _state(w), H)
    e_near = output_error(w, _exact(near), H)
    e_gptq = output_error(w, deq, H)
    assert e_gptq < 0.8 * e_near, (e_gptq, e_near)
    # same packed layout as nearest (act_order keeps the original column order: nothing else is stored)
    assert gq.packed.format == near.packed.format and gq.packed.params == near.packed.params
    assert {k: v.shape for k, v in gq.packed.tensors.items()} == {k: v.shape for k, v in near.packed.tensors.items()}


@pytest.mark.parametrize("apply_fn,kw", CASES, ids=["fq4", "fq3-asym", "bipolar3", "bcq3"])
def test_result_is_exactly_on_the_packed_grid(apply_fn, kw):
    w, H = _weight(2), _hessian(3)
    state, deq = quantize_with_hessian(_cfg(kw, rounding="gptq"), _state(w), H)
    assert torch.equal(_exact(state), deq)  # the grid values are what the format dequantizes to, bit for bit
    assert torch.equal(state.tensor, deq.to(w.dtype))
    p = state.packed
    if p.format == "gwint":  # codes within the b-bit range, scales per (group, row)
        assert p.tensors["scales"].shape == (3, N)
    else:
        coef = p.tensors["scales"] if p.params["kind"] == "bipolar" else p.tensors["alphas"]
        assert coef.shape[-2:] == (3, N)


def test_partial_last_group_is_fitted_from_its_own_columns():
    """With a diagonal H no error moves between columns, so group 2 (16 columns) must get exactly the scale of its
    own 16 weights per row: max|w| / 7, stored in bf16."""
    w = _weight(4)
    H = torch.diag(torch.rand(K) + 0.5)
    cfg = FineQuant(bits=4, group_size=32, clip_search=False, rounding="gptq")
    state, deq = quantize_with_hessian(cfg, _state(w), H)
    s = state.packed.tensors["scales"]  # [3, N]
    assert s.shape == (3, N)
    assert torch.equal(s[2], (w[:, 64:].float().abs().amax(1) / 7).to(torch.bfloat16))
    assert torch.equal(_exact(state), deq)


def test_gptq_core_reduces_to_nearest_with_a_diagonal_hessian():
    """With H diagonal there is nothing to feed the error to: GPTQ gives round-to-nearest on the same grid."""
    w = _weight(6)
    H = torch.diag(torch.rand(K) + 0.5)
    cfg = FineQuant(bits=4, group_size=32, clip_search=False)
    grid = FineQuant(bits=4, group_size=32, clip_search=False, rounding="gptq").column_grid(_state(w))
    res = gptq_quantize(w, H, grid, block_size=16)
    near = apply_finequant(cfg, _state(w))
    assert torch.equal(res.deq, _exact(near))


# --- config and engine --------------------------------------------------------------------------------------------

def test_kind_follows_rounding_and_gptq_options_need_it():
    assert FineQuant().kind is PassKind.TENSOR and Bipolar().kind is PassKind.TENSOR
    assert BCQ(rounding="gptq").kind is PassKind.MODEL
    with pytest.raises(RecipeError, match="need rounding: gptq"):
        parse_recipe("version: 1\npasses:\n  - {type: finequant, calibration: {samples: 4}}\n")
    with pytest.raises(RecipeError, match="rounding"):
        parse_recipe("version: 1\npasses:\n  - {type: bipolar, rounding: optimal}\n")


def test_bundled_recipes_take_a_calibration_override(tmp_path):
    for name in ("finequant-w4-gptq", "finequant-w3-gptq", "bipolar-w3-gptq"):
        r = load_recipe(name, [f"calibration.text={tmp_path}"])
        assert r.passes[0].rounding == "gptq" and r.passes[0].calib.text == str(tmp_path)
        assert r.passes[0].calib.samples == 64  # the rest of the recipe's calibration block is kept


def _gptq_recipe(body: str, text) -> str:
    return (f"version: 1\npasses:\n  - type: {body}\n    rounding: gptq\n"
            f"    calibration: {{text: {json.dumps(str(text))}, samples: 24, seq_len: 64, batch_size: 8}}\n")


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(TEXT)
    return p


def test_compress_packs_and_the_folder_loads(tmp_path, calib_file):
    from bitsmith.api import load

    model = make_calibrated_llama(tmp_path / "m")
    out = tmp_path / "out"
    body = "finequant\n    bits: 4\n    group_size: 32"
    summary = compress(parse_recipe(_gptq_recipe(body, calib_file)), model, out, progress=False)
    assert summary.per_pass[0]["kind"] == "model" and summary.per_pass[0]["changed"] == 14
    qc = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(qc) == 14 and all(e["format"] == "gwint" and e["group_size"] == 32 for e in qc.values())
    m = load(out)
    ids = torch.tensor([list(TEXT.encode()[:24])])
    with torch.no_grad():
        logits = m(input_ids=ids).logits
    assert logits.shape == (1, 24, 256) and bool(torch.isfinite(logits).all())
    # deterministic: the same recipe and input give the same bytes
    out2 = tmp_path / "out2"
    compress(parse_recipe(_gptq_recipe(body, calib_file)), model, out2, progress=False)
    assert (out / "model.safetensors").read_bytes() == (out2 / "model.safetensors").read_bytes()


@pytest.mark.parametrize("body", ["finequant\n    bits: 4\n    group_size: 32",
                                  "bipolar\n    bits: 3\n    group_size: 32",
                                  "bcq\n    bits: 2\n    group_size: 32"], ids=["finequant", "bipolar", "bcq"])
def test_gptq_coefficients_follow_the_model_dtype(tmp_path, calib_file, body):
    """The layers are calibrated in float32, but a bf16 model's scales/alphas are stored in bf16 (scale_dtype auto),
    so loading in the model's dtype keeps every weight exactly on the grid GPTQ rounded to."""
    from bitsmith.api import load
    from safetensors.torch import load_file

    model = make_calibrated_llama(tmp_path / "m")  # bf16
    out = tmp_path / "out"
    compress(parse_recipe(_gptq_recipe(body, calib_file)), model, out, progress=False)
    floats = {k: v.dtype for k, v in load_file(out / "model.safetensors").items()
              if v.is_floating_point() and ("scale" in k or "alpha" in k)}
    assert floats and set(floats.values()) == {torch.bfloat16}, floats
    exact = dict(load(out, dtype=torch.float32).named_modules())
    native = dict(load(out, dtype=torch.bfloat16).named_modules())
    for n, m in exact.items():
        if hasattr(m, "dequantized_weight"):
            assert torch.equal(m.dequantized_weight().to(torch.bfloat16), native[n].dequantized_weight()), n


@pytest.mark.parametrize("body", ["finequant\n    bits: 3\n    group_size: 32",
                                  "bipolar\n    bits: 3\n    group_size: 32"], ids=["finequant3", "bipolar3"])
def test_gptq_beats_nearest_through_the_engine(tmp_path, calib_file, body):
    """Whole tiny model through `compress`: summed over every packed Linear, the output error on the calibration
    activations (inputs of the original model) is lower with gptq than with nearest rounding."""
    from bitsmith.api import load
    from bitsmith.compress import calibration as C
    from bitsmith.quant.gptq import _Hessians

    model = make_calibrated_llama(tmp_path / "m", seed=3)
    recipe = _gptq_recipe(body, calib_file)
    compress(parse_recipe(recipe), model, tmp_path / "g", progress=False)
    compress(parse_recipe(f"version: 1\npasses:\n  - type: {body}\n"), model, tmp_path / "n", progress=False)
    ref = load(model, dtype=torch.float32)
    linears = {n: m for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    hs = _Hessians(linears)
    cal = parse_recipe(recipe).passes[0].calib
    tokens = C.calibration_batches(str(calib_file), C.load_tokenizer(model, "t"), cal.samples, cal.seq_len, cal.seed)
    with torch.no_grad():
        ref(input_ids=tokens)
    hs.remove()
    err = {}
    for k in "gn":
        packed = dict(load(tmp_path / k, dtype=torch.float32).named_modules())
        err[k] = sum(output_error(m.weight, packed[n].dequantized_weight().float(), hs.H[n])
                     for n, m in linears.items())
    assert err["g"] < 0.7 * err["n"], err


def test_plan_errors(tmp_path, calib_file):
    model = make_calibrated_llama(tmp_path / "m")
    with pytest.raises(RecipeError, match="does not exist"):
        compress(parse_recipe(_gptq_recipe("bcq\n    bits: 2\n    group_size: 32", tmp_path / "nope.txt")), model,
                 tmp_path / "o1", progress=False)
    two = (_gptq_recipe("finequant\n    bits: 4\n    group_size: 32", calib_file)
           + "  - {type: bipolar, bits: 3, group_size: 32}\n")
    with pytest.raises(PlanError, match="already packed"):
        compress(parse_recipe(two), model, tmp_path / "o2", progress=False)
    after = ("version: 1\npasses:\n  - {type: bipolar, bits: 3, group_size: 32}\n"
             + _gptq_recipe("finequant\n    bits: 4\n    group_size: 32", calib_file).split("passes:\n")[1])
    with pytest.raises(PlanError, match="cannot follow"):
        compress(parse_recipe(after), model, tmp_path / "o3", progress=False)


@pytest.mark.parametrize("name", ["finequant-w4-gptq", "finequant-w3-gptq", "bipolar-w3-gptq"])
def test_bundled_gptq_recipes_compress_a_tiny_llama(tmp_path, calib_file, name):
    model = make_calibrated_llama(tmp_path / "m")
    overrides = [f"calibration.text={calib_file}", "calibration.samples=4", "calibration.seq_len=32"]
    summary = compress(name, model, tmp_path / "o", overrides=overrides, progress=False)
    assert summary.per_pass[0]["changed"] == 14
    recorded = (tmp_path / "o" / "recipe.yaml").read_text()
    assert "rounding: gptq" in recorded and str(calib_file) in recorded
