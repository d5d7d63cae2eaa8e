import json

import pytest
import torch

import bitsmith
from bitsmith.compress.errors import CheckpointError, OutputError, PlanError
from bitsmith.compress.recipe import parse_recipe
from tests.conftest import folder_digest, make_tiny_llama

INT8 = "version: 1\npasses:\n  - type: finequant\n    bits: 8\n    group_size: channel\n"


def test_int8_output_folder(tiny_llama, tmp_path):
    before = folder_digest(tiny_llama)
    out = tmp_path / "out"
    summary = bitsmith.compress("int8", tiny_llama, out, progress=False)
    assert folder_digest(tiny_llama) == before  # the input is never written
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsmith" and qc["version"] == 1
    mods = qc["modules"]
    assert len(mods) == 14 and "lm_head" not in mods  # 7 Linear per layer, head ignored by the recipe
    down = mods["model.layers.0.mlp.down_proj"]
    assert down == {"format": "gwint", "format_version": 1, "in_features": 96, "out_features": 64, "bits": 8,
                    "group_size": 96, "symmetric": True}
    assert (out / "recipe.yaml").read_text().startswith("# applied by bitsmith")
    assert json.loads((out / "bitsmith.json").read_text())["base_model"] == "tiny-llama"
    # int8 codes plus one 16-bit scale per row: about half of bf16
    ratio = summary.linear_bytes_after / summary.linear_bytes_before
    assert 0.5 < ratio < 0.52
    assert not list(tmp_path.glob(".*bitsmith-partial"))


def test_packed_model_matches_dequantized_reference(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from bitsmith.kernels import gwint

    out = tmp_path / "out"
    bitsmith.compress(parse_recipe(INT8.replace("bits: 8", "bits: 4").replace("channel", "64")), tiny_llama, out,
                      progress=False)
    packed = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(packed.model.layers[0].mlp.down_proj).__name__ == "PackedLinear"
    # reference: the original architecture with every packed weight replaced by its exact dequantization
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    stored = load_file(out / "model.safetensors")
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    with torch.no_grad():
        for name, e in modules.items():
            w = gwint.dequantize(stored[f"{name}.qweight"], stored[f"{name}.scales"], stored.get(f"{name}.zeros"),
                                 e["bits"], e["group_size"], e["in_features"], dtype=torch.float32)
            ref.get_submodule(name).weight.copy_(w)
    ids = torch.randint(0, 128, (2, 17))
    with torch.no_grad():
        a, b = packed(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    gen = packed.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


def test_tied_head_is_reported_not_lost(tiny_llama_tied, tmp_path):
    recipe = parse_recipe(INT8.replace("    group_size: channel\n", "    group_size: channel\n    ignore: []\n"))
    summary = bitsmith.compress(recipe, tiny_llama_tied, tmp_path / "out", progress=False)
    skipped = summary.per_pass[0]["skipped_modules"]
    assert "lm_head" in skipped and "tied" in skipped["lm_head"]


def test_sharded_output_with_index(tiny_llama, tmp_path):
    out = tmp_path / "out"
    bitsmith.compress("int8", tiny_llama, out, shard_size="30KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    from bitsmith.compress.checkpoint import CheckpointReader

    assert set(CheckpointReader(out).names) == set(index["weight_map"])


def test_target_matching_nothing_lists_what_exists(tiny_llama, tmp_path):
    recipe = parse_recipe(INT8 + "    targets: ['re:.*nonexistent.*']\n")
    with pytest.raises(PlanError, match=r"matches no module.*Linear"):
        bitsmith.compress(recipe, tiny_llama, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_shape_contradicting_config(tiny_llama, tmp_path):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"contradict config.json.*down_proj.weight: stored \[64, 96\]"):
        bitsmith.compress("int8", tiny_llama, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_output_exists_needs_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputError, match="--overwrite"):
        bitsmith.compress("int8", tiny_llama, out, progress=False)
    assert (out / "keep.txt").exists()
    bitsmith.compress("int8", tiny_llama, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_disk_full_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    import errno

    from bitsmith.compress import writer

    calls = {"n": 0}
    real_add = writer._Shard.add

    def failing_add(self, name, t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, name, t)

    monkeypatch.setattr(writer._Shard, "add", failing_add)
    with pytest.raises(OutputError, match="disk full"):
        bitsmith.compress("int8", tiny_llama, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_missing_output_parent(tiny_llama, tmp_path):
    with pytest.raises(OutputError, match="parent folder does not exist"):
        bitsmith.compress("int8", tiny_llama, tmp_path / "no" / "out", progress=False)


def test_model_pass_after_packing_is_refused(tiny_llama, tmp_path):
    from typing import Literal

    from bitsmith.compress.passes import PassConfig, PassKind, register_pass

    class Noop(PassConfig):
        type: Literal["test_noop_model"] = "test_noop_model"
        kind = PassKind.MODEL

    register_pass(Noop, apply=lambda cfg, model, ctx: None)
    recipe = parse_recipe(INT8 + "  - type: test_noop_model\n")
    with pytest.raises(PlanError, match="cannot follow passes\\[0\\] \\(finequant\\)"):
        bitsmith.compress(recipe, tiny_llama, tmp_path / "out", progress=False)


def test_model_pass_runs_on_materialized_model(tiny_llama, tmp_path):
    from typing import Literal

    from bitsmith.compress.passes import PassConfig, PassKind, register_pass

    class ZeroNorms(PassConfig):
        type: Literal["test_zero_norms"] = "test_zero_norms"
        kind = PassKind.MODEL

    def zero_norms(cfg, model, ctx):
        with torch.no_grad():
            model.model.norm.weight.zero_()

    register_pass(ZeroNorms, apply=zero_norms)
    out = tmp_path / "out"
    bitsmith.compress(parse_recipe("version: 1\npasses:\n  - type: test_zero_norms\n" + INT8.split("passes:\n")[1]),
                      tiny_llama, out, progress=False)
    from bitsmith.compress.checkpoint import CheckpointReader

    r = CheckpointReader(out)
    assert torch.count_nonzero(r.get("model.norm.weight")) == 0
    assert "model.layers.0.mlp.up_proj.qweight" in r


def test_apply_in_memory(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        dense = model(ids).logits
    bitsmith.apply(model, [bitsmith.FineQuant(bits=8, group_size="channel")])
    assert type(model.model.layers[1].self_attn.q_proj).__name__ == "PackedLinear"
    with torch.no_grad():
        q = model(ids).logits
    assert (q - dense).abs().max() < 0.05 * dense.abs().max()


@pytest.mark.parametrize("device", ["gpu0", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_unusable_device_is_refused_before_anything_is_written(tiny_llama, tmp_path, device):
    out = tmp_path / "out"
    with pytest.raises(PlanError, match="--device"):
        bitsmith.compress("int8", tiny_llama, out, progress=False, device=device)
    assert not out.exists() and not list(tmp_path.glob(".*bitsmith-partial"))


def test_summary_names_model_passes_instead_of_a_tensor_count():
    from pathlib import Path

    from bitsmith.compress.pipeline import Summary

    passes = [{"index": 0, "type": "block_sparse", "changed": None, "skipped": 0},
              {"index": 1, "type": "pack_bsr", "changed": 210, "skipped": 1}]
    text = Summary(Path("out"), 1.0, 10, 5, 4, 2, 3, passes).render()
    assert "passes[0] block_sparse: model pass\n" in text and "None" not in text
    assert "passes[1] pack_bsr: 210 tensors changed, 1 skipped" in text
