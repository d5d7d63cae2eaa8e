"""block_sparse and pack_bsr through the pipeline on a tiny Llama with a byte tokenizer (built in-test)."""

import json

import pytest
import torch

import bitsmith
from bitsmith.compress.errors import PlanError, RecipeError
from bitsmith.compress.recipe import load_recipe, parse_recipe
from bitsmith.kernels import bsr, gwint


def recipe(*passes: str):
    return parse_recipe("version: 1\npasses:\n" + "".join(f"  - {p}\n" for p in passes))


def stored(out):
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())


def test_prune_and_pack_dense_values(tiny_lm, calib_text, tmp_path):
    out = tmp_path / "out"
    r = recipe(f"{{type: block_sparse, sparsity: 0.5, block: 16x16, score: activation, refit: true,"
               f" text: {calib_text}, samples: 6, seq_len: 48}}", "{type: pack_bsr}")
    bitsmith.compress(r, tiny_lm, out, progress=False)
    tensors, cfg = stored(out)
    mods = cfg["quantization_config"]["modules"]
    assert len(mods) == 14 and "lm_head" not in mods
    for name, e in mods.items():
        assert e["format"] == "bsr" and e["bits"] is None and (e["block_rows"], e["block_cols"]) == (16, 16)
        total = (e["out_features"] // 16) * (e["in_features"] // 16)
        assert e["nnz_blocks"] == total - round(0.5 * total)  # layer scope: exactly half the blocks of each
        t = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert t["values"].dtype == torch.bfloat16
    # the packed model computes what the masked dense weights compute
    from transformers import AutoModelForCausalLM

    packed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    with torch.no_grad():
        for name, e in mods.items():
            t = {k.split(".")[-1]: v for k, v in tensors.items() if k.startswith(name + ".")}
            ref.get_submodule(name).weight.copy_(bsr.dequantize(t, e, torch.float32))
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        assert torch.allclose(packed(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_prune_finequant_pack_gives_quantized_bsr(tiny_lm, calib_text, tmp_path):
    out = tmp_path / "out"
    r = recipe("{type: block_sparse, sparsity: 0.75, block: [16, 32], score: magnitude}",
               "{type: finequant, bits: 4, group_size: 32}", "{type: pack_bsr}")
    summary = bitsmith.compress(r, tiny_lm, out, progress=False)
    tensors, cfg = stored(out)
    e = cfg["quantization_config"]["modules"]["model.layers.1.mlp.down_proj"]  # [64, 96]
    assert (e["format"], e["bits"], e["group_size"], e["nnz_blocks"]) == ("bsr", 4, 32, 3)
    q = tensors["model.layers.1.mlp.down_proj.qvalues"]
    assert q.dtype == torch.uint8 and q.shape == (3, 16, 16)
    # 25% of the blocks at 4 bits plus scales and indexes: about a tenth of bf16
    assert summary.linear_bytes_after < 0.12 * summary.linear_bytes_before
    # `bitsmith inspect` reports each module's stored share (the [64, 96] one: 3 of 4 x 3 blocks, 75 % sparse)
    from bitsmith.compress.inspect import inspect_checkpoint

    rows = {r["module"]: r for r in inspect_checkpoint(out)["modules"]}
    assert rows["model.layers.1.mlp.down_proj"]["sparsity"] == pytest.approx(0.75)
    assert rows["lm_head"]["sparsity"] == 0.0


def test_pack_bsr_matches_finequant_alone(tiny_lm, tmp_path):
    """The fused sparse-int8 format dequantizes to exactly what finequant alone stores for the pruned weights."""
    prune = "{type: block_sparse, sparsity: 0.5, block: [32, 16], score: magnitude}"
    fq = "{type: finequant, bits: 8, group_size: 32}"
    bitsmith.compress(recipe(prune, fq), tiny_lm, tmp_path / "gw", progress=False)
    bitsmith.compress(recipe(prune, fq, "{type: pack_bsr}"), tiny_lm, tmp_path / "bs", progress=False)
    gw, gcfg = stored(tmp_path / "gw")
    bs, bcfg = stored(tmp_path / "bs")
    for name, e in bcfg["quantization_config"]["modules"].items():
        g = gcfg["quantization_config"]["modules"][name]
        wg = gwint.dequantize(gw[f"{name}.qweight"], gw[f"{name}.scales"], None, 8, g["group_size"],
                              g["in_features"], dtype=torch.float32)
        t = {k.split(".")[-1]: v for k, v in bs.items() if k.startswith(name + ".")}
        assert torch.equal(bsr.dequantize(t, e, torch.float32), wg), name


def test_plan_errors(tiny_lm, calib_text, tmp_path):
    with pytest.raises(PlanError, match="does not tile"):  # intermediate 96 is not a multiple of 64
        bitsmith.compress(recipe("{type: block_sparse, block: [64, 64], score: magnitude}"), tiny_lm,
                          tmp_path / "a", progress=False)
    with pytest.raises(RecipeError, match="does not exist"):
        bitsmith.compress(recipe("{type: block_sparse, text: /nonexistent/book.txt}"), tiny_lm, tmp_path / "b",
                          progress=False)
    with pytest.raises(PlanError, match="block auto needs a block_sparse"):
        bitsmith.compress(recipe("{type: pack_bsr}"), tiny_lm, tmp_path / "c", progress=False)
    with pytest.raises(PlanError, match="asymmetric"):
        bitsmith.compress(recipe("{type: block_sparse, score: magnitude}",
                                 "{type: finequant, bits: 4, group_size: 32, symmetric: false}", "{type: pack_bsr}"),
                          tiny_lm, tmp_path / "d", progress=False)
    with pytest.raises(PlanError, match="differs"):
        bitsmith.compress(recipe("{type: block_sparse, score: magnitude, block: [16, 16]}",
                                 "{type: pack_bsr, block: [32, 16]}"), tiny_lm, tmp_path / "e", progress=False)
    assert not any(p.name in "abcde" for p in tmp_path.iterdir())


@pytest.mark.parametrize("bad,match", [("sparsity: 1.0", "sparsity"), ("block: [0, 4]", "positive"),
                                       ("score: snip", "score"), ("scope: global, sparsity: 0.99", "max_sparsity"),
                                       ("samples: 0", "samples")])
def test_config_validation(bad, match):
    with pytest.raises(RecipeError, match=match):
        recipe(f"{{type: block_sparse, {bad}}}")


def test_global_scope_with_bounds(tiny_lm, tmp_path):
    out = tmp_path / "out"
    r = recipe("{type: block_sparse, sparsity: 0.6, block: [16, 16], score: magnitude, scope: global,"
               " min_sparsity: 0.3, max_sparsity: 0.9}", "{type: pack_bsr}")
    bitsmith.compress(r, tiny_lm, out, progress=False)
    _, cfg = stored(out)
    kept = total = 0
    for e in cfg["quantization_config"]["modules"].values():
        n = (e["out_features"] // 16) * (e["in_features"] // 16)
        assert 0.3 - 1e-9 <= 1 - e["nnz_blocks"] / n <= 0.9 + 1e-9
        kept, total = kept + e["nnz_blocks"], total + n
    assert abs((1 - kept / total) - 0.6) < 0.02


def test_apply_on_a_model_in_memory(tiny_lm):
    from transformers import AutoModelForCausalLM

    from bitsmith.prune.block_sparse import BlockSparse, PackBsr

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    bitsmith.apply(model, [BlockSparse(sparsity=0.5, block=(1, 4), score="magnitude")])
    w = model.model.layers[0].self_attn.q_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(0.5)
    assert bool((w.reshape(64, 16, 4) == 0).all(-1).eq((w.reshape(64, 16, 4) == 0).any(-1)).all())  # whole blocks
    with pytest.raises(PlanError, match="block auto"):
        bitsmith.apply(model, [PackBsr()])
    bitsmith.apply(model, [PackBsr(block=(1, 4))])
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "PackedLinear"
    assert model(torch.randint(0, 256, (1, 5))).logits.isfinite().all()


def test_activation_scores_need_a_tokenizer(tiny_llama):
    from transformers import AutoModelForCausalLM

    from bitsmith.prune.block_sparse import BlockSparse

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # a folder without tokenizer files
    with pytest.raises(RecipeError, match="tokenizer"):
        bitsmith.apply(model, [BlockSparse(sparsity=0.5, score="activation")])


@pytest.mark.parametrize("name", ["block-sparse-50", "block-sparse-80", "block-sparse-80-w4"])
def test_bundled_recipes_plan(name, tiny_lm):
    from bitsmith.compress.checkpoint import CheckpointReader
    from bitsmith.compress.pipeline import make_plan
    from bitsmith.compress.sources import CheckpointSource

    r = load_recipe(name, ["block=[16, 16]"])  # the tiny model's widths (64, 96) are not multiples of 32
    types = [p.type for p in r.passes]
    assert types[0] == "block_sparse" and types[-1] == "pack_bsr" and "recover" in types
    make_plan(r, CheckpointSource(CheckpointReader(tiny_lm)))


def test_magnitude_is_a_streamed_tensor_pass_with_the_model_pass_masks(tiny_lm, tmp_path):
    """Weights-only magnitude pruning streams (tensor kind, --workers); its masks equal the in-memory rule's."""
    from transformers import AutoModelForCausalLM

    from bitsmith.compress.passes import PassKind
    from bitsmith.prune.block_sparse import BlockSparse, prune_model

    cfg = BlockSparse(sparsity=0.6, block=(16, 16), score="magnitude", scope="row")
    assert cfg.kind is PassKind.TENSOR
    assert BlockSparse(score="magnitude", scope="global").kind is PassKind.MODEL
    assert BlockSparse(score="magnitude", refit=True).kind is PassKind.MODEL
    assert BlockSparse(score="activation").kind is PassKind.MODEL
    r = recipe("{type: block_sparse, sparsity: 0.6, block: [16, 16], score: magnitude, scope: row}")
    bitsmith.compress(r, tiny_lm, tmp_path / "one", progress=False)
    bitsmith.compress(r, tiny_lm, tmp_path / "two", progress=False, workers=2)
    one, _ = stored(tmp_path / "one")
    two, _ = stored(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.bfloat16)
    prune_model(model, cfg)
    sd = model.state_dict()
    w = one["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(w, sd["model.layers.1.mlp.down_proj.weight"])
    assert float((w == 0).float().mean()) == pytest.approx(4 / 6)  # row scope: round(0.6 * 6) of 6 blocks per row
    assert torch.equal(one["lm_head.weight"], sd["lm_head.weight"])  # untargeted stays as it was
