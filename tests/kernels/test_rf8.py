"""rf8: the code table, exact pack/unpack, the format registry, and the Triton kernel (TRITON_INTERPRET=1 on CPU)
against the torch reference on awkward shapes."""

import pytest
import torch

from bitsmith.compress.errors import CheckpointError
from bitsmith.compress.formats import check_module_entry, get_format
from bitsmith.kernels import rf8
from tests.kernels.conftest import DEVICE, INTERPRETING, ON_GPU

needs_triton = pytest.mark.skipif(rf8.triton is None or not (ON_GPU or INTERPRETING),
                                  reason="needs Triton with a GPU or TRITON_INTERPRET=1")


def test_code_table_follows_the_layout():
    t = rf8.decode_table()
    for code in range(256):
        s1, E, d, s2 = code >> 7, (code >> 3) & 15, (code >> 1) & 3, code & 1
        if E == 0:
            assert t[code] == 0
            continue
        e1, e2 = E - 15, E - 15 - (d + 1)
        assert 1 <= e1 - e2 <= 4
        expect = (-1) ** s1 * (2.0**e1 + (-1) ** s2 * 2.0**e2)
        assert float(t[code]) == expect, code
    mags = sorted({abs(float(v)) for v in t})
    assert mags[-1] == 1.5 and mags[1] == 2.0**-15
    octave = sorted(m / 2.0**-3 for m in mags if 2.0**-3 <= m < 2.0**-2)
    assert octave == [1.0, 1.0625, 1.125, 1.25, 1.5, 1.75, 1.875]


@pytest.mark.parametrize("scope,group", [("group", None), ("group", 16), ("tensor", None)])
def test_every_representable_value_round_trips_exactly(scope, group):
    t = rf8.decode_table(torch.float32)
    t = t[t.abs() < 1.0]  # the values under offset 0 below 2^0 (o = 0 when the largest is in [0.5, 1))
    w = torch.cat([t, t[: (-t.numel()) % 16]]).reshape(-1, 16) * 2.0**-4  # offset -4 in every group of 16
    w[:, 0] = 0.9375 * 2.0**-4
    tensors, params = rf8.pack(w, group, scope)
    assert bool((tensors["exps"] == -4).all())
    assert tensors["qweight"].dtype == torch.uint8 and tensors["exps"].dtype == torch.int8
    d = rf8.dequantize(tensors, params)
    assert torch.equal(d, w)
    again, _ = rf8.pack(d, group, scope)
    assert torch.equal(again["qweight"], tensors["qweight"])


def test_rounds_to_the_nearest_level():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(17, 45, generator=g) * torch.logspace(-3, 1, 45)
    w[3, 7] = 0.0
    tensors, params = rf8.pack(w, 16)
    d = rf8.dequantize(tensors, params).double()
    assert d[3, 7] == 0
    assert bool((torch.sign(d) * torch.sign(w.double()) >= 0).all())
    # brute force: the nearest value of the group's 256 codes
    o = tensors["exps"].long()  # [17, 3]
    table = rf8.decode_table()
    for n in range(17):
        for k in range(45):
            cand = table * 2.0 ** int(o[n, k // 16])
            best = (cand - float(w[n, k])).abs().min()
            assert abs(float(d[n, k]) - float(w[n, k])) <= float(best) + 1e-12
    assert int(o[0, 2]) > int(o[0, 0])  # the later columns are larger: their offset is larger
    assert params == {"in_features": 45, "out_features": 17, "group_size": 16, "scope": "group"}


def test_range_and_zero_groups():
    w = torch.zeros(2, 8)
    w[1] = torch.tensor([1e-30, -3.0, 1e-12, 0.5, 2.0, -2.9, 0.0, 1.0])
    tensors, params = rf8.pack(w)
    d = rf8.dequantize(tensors, params)
    assert torch.equal(d[0], torch.zeros(8)) and int(tensors["exps"][0, 0]) == 0
    assert d[1, 0] == 0 and d[1, 2] == 0  # below 2^(o-15): flushed to zero
    assert d[1, 1] == -3.0 and d[1, 3] == 0.5 and d[1, 7] == 1.0 and d[1, 4] == 2.0
    assert int(tensors["exps"][1, 0]) == 2 and d[1, 5] == -3.0  # levels near 2.9: 2.5, 3.0, 3.5



def test_format_registry_and_bits():
    fmt = get_format("rf8")
    w = torch.randn(24, 40)
    tensors, params = rf8.pack(w, 16)
    specs = fmt.tensor_specs(params, torch.bfloat16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == specs
    assert fmt.bits_per_weight(params, torch.bfloat16) == pytest.approx(8 + 8 * 3 / 40)
    tensors_t, params_t = rf8.pack(w, scope="tensor")
    assert fmt.tensor_specs(params_t, torch.bfloat16)["exps"][0] == (1, 1)
    entry = {"format": "rf8", "format_version": 1, **params}
    assert check_module_entry("m", entry) == entry
    with pytest.raises(CheckpointError, match="group_size"):
        check_module_entry("m", {**entry, "group_size": 0})
    with pytest.raises(CheckpointError, match="scope"):
        check_module_entry("m", {**entry, "scope": "row"})
    with pytest.raises(CheckpointError, match="version"):
        check_module_entry("m", {**entry, "format_version": 2})
    x = torch.randn(3, 40)
    assert torch.allclose(fmt.linear(x, tensors, params, None), x @ rf8.dequantize(tensors, params).t(), atol=1e-5)


def rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


@needs_triton
@pytest.mark.parametrize("M,N,K,group,scope", [(1, 7, 13, None, "group"), (5, 33, 70, 16, "group"),
                                               (17, 40, 96, 32, "group"), (3, 19, 50, None, "tensor"),
                                               (33, 64, 37, 8, "group")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_matches_the_reference(M, N, K, group, scope, dtype):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    w = torch.randn(N, K, generator=g) * torch.logspace(-2, 0, K)
    tensors, params = rf8.pack(w, group, scope)
    tensors = {k: v.to(DEVICE) for k, v in tensors.items()}
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    bias = torch.randn(N, generator=g).to(DEVICE, dtype)
    ref = rf8.linear_reference(x.float(), tensors, params, bias.float())
    out = rf8.triton_linear(x, tensors, params, bias)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 3e-3)
    out3 = rf8.triton_linear(x.reshape(1, M, K), tensors, params, None)
    assert rel(out3.reshape(M, N), ref - bias.float()) < 1e-2


@needs_triton
def test_dispatch_uses_triton_when_forced(monkeypatch):
    w = torch.randn(16, 32)
    tensors, params = rf8.pack(w.to(DEVICE))  # forced Triton needs the tensors where the kernels run
    x = torch.randn(2, 32).to(DEVICE, torch.bfloat16)
    monkeypatch.setenv("BITSMITH_TRITON", "1")
    calls = []
    real = rf8.triton_linear
    monkeypatch.setattr(rf8, "triton_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = rf8.linear(x, tensors, params)
    assert calls and rel(out, rf8.linear_reference(x.float(), tensors, params)) < 1e-2
    monkeypatch.setenv("BITSMITH_TRITON", "0")
    rf8.linear(x, tensors, params)
    assert len(calls) == 1


def test_rf8_pass_and_recipe_end_to_end(tmp_path):
    import json

    import bitsmith
    from bitsmith.compress.recipe import load_recipe, parse_recipe
    from tests.conftest import make_tiny_llama

    src = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "rf8"
    bitsmith.compress(load_recipe("rf8-nearest"), src, out, progress=False)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 14 and all(m["format"] == "rf8" for m in modules.values())
    assert modules["model.layers.0.mlp.down_proj"]["group_size"] == 96
    from safetensors.torch import load_file

    dense = load_file(src / "model.safetensors")
    model = bitsmith.load(out)
    w = dense["model.layers.1.self_attn.o_proj.weight"]
    mod = model.model.layers[1].self_attn.o_proj
    tensors, params = rf8.pack(w)
    assert torch.equal(mod.qweight, tensors["qweight"]) and torch.equal(mod.exps, tensors["exps"])
    assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()
    out_t = tmp_path / "rf8t"
    r = parse_recipe("version: 1\npasses:\n  - {type: rf8, group_size: tensor}\n")
    bitsmith.compress(r, src, out_t, progress=False)
    mt = json.loads((out_t / "config.json").read_text())["quantization_config"]["modules"]
    assert all(m["scope"] == "tensor" for m in mt.values())
    with pytest.raises(Exception, match="group_size"):
        parse_recipe("version: 1\npasses:\n  - {type: rf8, group_size: 0}\n")


def test_gptq_rounding_lands_on_the_grid_and_lowers_output_error():
    from bitsmith.quant.rf8 import _group_offsets, gptq_round, round_nearest

    g = torch.Generator().manual_seed(3)
    K = 96
    X = torch.randn(2048, K, generator=g) @ (0.3 * torch.randn(K, K, generator=g) + torch.eye(K))
    H = X.t() @ X
    w = torch.randn(40, K, generator=g) * 0.05
    for group in ("channel", 32):
        q = gptq_round(w, H, group, block_size=32)
        tensors, params = rf8.pack(q, None if group == "channel" else group)
        assert torch.equal(rf8.dequantize(tensors, params), q)  # on the grid, same offsets: packs exactly
        r = round_nearest(w, _group_offsets(w, group))
        assert torch.equal(r, rf8.dequantize(*rf8.pack(w, None if group == "channel" else group)))

        def err(a):
            return float((((a - w) @ H) * (a - w)).sum())

        assert err(q) < 0.8 * err(r)


def test_rf8_gptq_recipe(tmp_path):
    import json

    import bitsmith
    from bitsmith.compress.recipe import parse_recipe
    from tests.prune.conftest import TEXT, make_calibrated_llama

    src = make_calibrated_llama(tmp_path / "tiny")
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    r = parse_recipe(f"version: 1\npasses:\n  - {{type: rf8_gptq, text: {calib}, samples: 4, seq_len: 64}}\n"
                     "  - {type: rf8}\n")
    out = tmp_path / "out"
    bitsmith.compress(r, src, out, progress=False)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 14 and all(m["format"] == "rf8" for m in modules.values())
    from safetensors.torch import load_file

    dense = load_file(src / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    packed = load_file(out / "model.safetensors")
    near, _ = rf8.pack(dense)
    assert not torch.equal(packed["model.layers.0.mlp.down_proj.qweight"], near["qweight"])  # not plain rounding
    assert torch.equal(packed["model.layers.0.mlp.down_proj.exps"], near["exps"])


def test_bundled_rf8_recipe_rounds_by_gptq_on_the_bundled_sample(tmp_path):
    import json

    import bitsmith
    from bitsmith.compress.recipe import load_recipe
    from tests.prune.conftest import make_calibrated_llama

    src = make_calibrated_llama(tmp_path / "tiny")
    recipe = load_recipe("rf8")
    assert [p.type for p in recipe.passes] == ["rf8_gptq", "rf8"]
    out = tmp_path / "out"
    bitsmith.compress(recipe, src, out, progress=False)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert len(modules) == 14 and all(m["format"] == "rf8" for m in modules.values())
