"""Loading packed folders through transformers: a tiny Llama is packed by hand (gwint), then loaded back."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bitsmith.compress import hf_integration  # noqa: E402
from bitsmith.compress.errors import BitsmithError, CheckpointError  # noqa: E402
from bitsmith.compress.hf_integration import BitsmithConfig, load, load_tokenizer, register  # noqa: E402
from bitsmith.kernels import gwint  # noqa: E402
from bitsmith.kernels.modules import PackedLinear  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# Per Linear: (bits, group_size or None for per-channel, symmetric). down_proj has K = 96: with g64 the last group
# is partial. In the mixed scheme it is also the asymmetric one (zeros tensor).
SCHEME = {
    "self_attn.q_proj": (8, None, True), "self_attn.k_proj": (4, 64, True), "self_attn.v_proj": (8, None, True),
    "self_attn.o_proj": (4, 64, True), "mlp.gate_proj": (8, None, True), "mlp.up_proj": (4, 64, True),
    "mlp.down_proj": (4, 64, False),
}
SCHEMES = {"mixed": SCHEME, "int8-per-channel": dict.fromkeys(LINEARS, (8, None, True)),
           "int4-g64": dict.fromkeys(LINEARS, (4, 64, True))}


def quantize_gwint(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """Round-to-nearest group-wise quantization of w [N, K] into gwint v1 tensors (test helper, not a pass)."""
    N, K = w.shape
    G = math.ceil(K / group_size)
    wp = torch.zeros(N, G * group_size)
    wp[:, :K] = w.float()
    wg = wp.view(N, G, group_size)  # [N, G, g]; padding zeros do not change absmax/min/max meaningfully
    qmax = (1 << bits) - 1
    if symmetric:
        half = 1 << (bits - 1)
        scales = (wg.abs().amax(-1) / (half - 1)).clamp_min(1e-8)  # [N, G]
        codes = (torch.round(wg / scales[..., None]) + half).clamp(0, qmax)
        out = {"scales": scales}
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        scales = ((hi - lo) / qmax).clamp_min(1e-8)
        zeros = torch.round(-lo / scales).clamp(0, qmax)
        codes = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(0, qmax)
        out = {"scales": scales, "zeros": zeros.to(torch.uint8).t().contiguous()}
    codes = codes.view(N, G * group_size)[:, :K].to(torch.uint8)
    out["qweight"] = gwint.pack_codes(codes, bits)
    out["scales"] = out["scales"].to(w.dtype).t().contiguous()  # [G, N]
    return out


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie,
                      attention_bias=not tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped tensor cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def pack_folder(dense: Path, out: Path, shards: int = 1, scheme: dict = SCHEME) -> dict[str, torch.Tensor]:
    """Write a packed copy of `dense` into `out`; return the dequantized weights {module.weight: W}."""
    shutil.copytree(dense, out)
    (out / "model.safetensors").unlink()
    state = load_file(dense / "model.safetensors")
    config = json.loads((dense / "config.json").read_text())
    modules, tensors, dequantized = {}, {}, {}
    for key, t in state.items():
        module = key.rsplit(".", 1)[0]
        suffix = module.split(".", 3)[-1] if module.startswith("model.layers.") else None
        if suffix in scheme and key.endswith(".weight"):
            bits, group, sym = scheme[suffix]
            N, K = t.shape
            g = group or K
            packed = quantize_gwint(t, bits, g, sym)
            modules[module] = {"format": "gwint", "format_version": 1, "in_features": K, "out_features": N,
                               "bits": bits, "group_size": g, "symmetric": sym}
            tensors.update({f"{module}.{s}": v for s, v in packed.items()})
            dequantized[key] = gwint.dequantize(packed["qweight"], packed["scales"], packed.get("zeros"), bits, g, K)
        else:
            tensors[key] = t
    config["quantization_config"] = {"quant_method": "bitsmith", "version": 1, "modules": modules}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    keys = sorted(tensors)
    if shards == 1:
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[i::shards]}
            save_file(part, out / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, fname))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    return dequantized


@pytest.fixture(params=[(True, "mixed"), (False, "mixed"), (True, "int8-per-channel"), (False, "int4-g64")],
                ids=lambda p: f"{'tied' if p[0] else 'untied'}-{p[1]}")
def folders(request, tmp_path):
    tie, scheme = request.param
    model = tiny_llama(tie)
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    packed = tmp_path / "packed"
    dequantized = pack_folder(dense, packed, shards=1 if tie else 2, scheme=SCHEMES[scheme])
    reference = tiny_llama(tie)
    with torch.no_grad():
        for key, w in dequantized.items():
            reference.get_parameter(key).copy_(w)
    register()
    return packed, reference


def rewrite_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 9, 33, 77, 100, 3, 64], [1, 127, 2, 8, 8, 40, 51, 12]])


def test_from_pretrained_packs_and_matches_dequantized_dense(folders):
    packed, reference = folders
    model, info = AutoModelForCausalLM.from_pretrained(packed, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for i in range(2):
        layer = model.model.layers[i]
        for name in LINEARS:
            assert isinstance(layer.get_submodule(name), PackedLinear), name
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    down = model.model.layers[0].mlp.down_proj
    assert (getattr(down, "zeros", None) is not None) == (not down.params["symmetric"])
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (not reference.config.tie_word_embeddings)
    with torch.no_grad():
        got, want = model(ids()).logits, reference(ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.is_quantized and model.config.quantization_config.modules


def test_generate(folders):
    packed, reference = folders
    model = AutoModelForCausalLM.from_pretrained(packed)
    prompt = ids()[:1]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 6)
    torch.testing.assert_close(out, reference.generate(prompt, max_new_tokens=6, do_sample=False))


def test_every_tensor_is_the_files_own(folders, monkeypatch):
    """Poison: anything transformers allocates without loading (empty_like / empty) is NaN or 0x5A5A5A5A, so a
    tensor left uninitialised cannot pass the bit-for-bit comparison with the files."""
    packed, _ = folders
    real_empty_like, real_empty = torch.empty_like, torch.empty

    def poisoned(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(0x5A5A5A5A if t.dtype == torch.int32 else 90)

    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    model = AutoModelForCausalLM.from_pretrained(packed)
    monkeypatch.undo()
    on_disk = {}
    for f in packed.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            on_disk.update({k: fh.get_tensor(k) for k in fh.keys()})
    state = model.state_dict()
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(state) - tied == set(on_disk)
    for key, t in on_disk.items():
        assert state[key].dtype == t.dtype, key
        assert torch.equal(state[key], t), key
    assert not any(torch.isnan(v).any() for v in state.values() if v.is_floating_point())


def test_unknown_format_refused_before_anything_is_imported(tmp_path):
    model = tiny_llama(True)
    model.save_pretrained(tmp_path / "dense")
    pack_folder(tmp_path / "dense", tmp_path / "packed")
    name = "model.layers.1.mlp.up_proj"
    rewrite_config(tmp_path / "packed", lambda q: q["modules"][name].update(format="evil.module:Foo"))
    register()
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    msg = str(err.value)
    assert name in msg and "evil.module:Foo" in msg
    assert "gwint" in msg.split("allowed formats:")[1]
    assert "evil" not in sys.modules and "evil.module" not in sys.modules


@pytest.mark.parametrize("edit, expect", [
    (lambda q: q.update(version=2), "upgrade bitsmith"),
    (lambda q: q.update(extra=1), "unknown key(s) ['extra']"),
    (lambda q: q.update(modules={}), "non-empty"),
    (lambda q: q["modules"]["model.layers.0.mlp.up_proj"].update(format_version=9),
     "modules['model.layers.0.mlp.up_proj']: format 'gwint' version 9"),
    (lambda q: q["modules"]["model.layers.0.mlp.up_proj"].pop("bits"), "modules['model.layers.0.mlp.up_proj']: gwint 'bits' must be an integer 1..8, got None"),
    (lambda q: q["modules"]["model.layers.0.mlp.up_proj"].update(bits=12),
     "modules['model.layers.0.mlp.up_proj']: gwint 'bits' must be an integer 1..8, got 12"),
    (lambda q: q["modules"].update({"model.layers.7.mlp.up_proj": q["modules"]["model.layers.0.mlp.up_proj"]}),
     "model.layers.7.mlp.up_proj: no such module"),
    (lambda q: q["modules"].update({"model.norm": {**q["modules"]["model.layers.0.mlp.up_proj"]}}),
     "model.norm: is a LlamaRMSNorm"),
    (lambda q: q["modules"]["model.layers.0.mlp.up_proj"].update(in_features=32),
     "model.layers.0.mlp.up_proj: the model's Linear is 64 -> 96"),
], ids=["version", "extra-key", "empty", "format-version", "no-bits", "bits-12", "absent", "not-linear", "shape"])
def test_bad_config_refused(tmp_path, edit, expect):
    tiny_llama(True).save_pretrained(tmp_path / "dense")
    pack_folder(tmp_path / "dense", tmp_path / "packed")
    rewrite_config(tmp_path / "packed", edit)
    register()
    with pytest.raises(CheckpointError, match=None) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert expect in str(err.value)


def _drop(key):
    def edit(t):
        del t[key]
    return edit


@pytest.mark.parametrize("edit, expect", [
    (_drop("model.layers.1.self_attn.o_proj.scales"), "model.layers.1.self_attn.o_proj.scales: missing"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": t["model.layers.0.mlp.up_proj.qweight"].float()}),
     "model.layers.0.mlp.up_proj.qweight: dtype torch.float32, format 'gwint' needs torch.int32"),
    (lambda t: t.update({"model.layers.0.mlp.down_proj.zeros": t["model.layers.0.mlp.down_proj.zeros"][:1]}),
     "model.layers.0.mlp.down_proj.zeros: shape [1, 64], format 'gwint' needs [2, 64]"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}),
     "model.layers.0.mlp.up_proj.weight: a dense weight"),
], ids=["missing", "dtype", "shape", "leftover-dense"])
def test_tensors_that_contradict_the_config_are_refused(tmp_path, edit, expect):
    tiny_llama(True).save_pretrained(tmp_path / "dense")
    pack_folder(tmp_path / "dense", tmp_path / "packed")
    tensors = load_file(tmp_path / "packed" / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "packed" / "model.safetensors", metadata={"format": "pt"})
    register()
    with pytest.raises(CheckpointError) as err:
        AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert expect in str(err.value)


def test_config_round_trips_through_save_pretrained(folders, tmp_path):
    packed, _ = folders
    original = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert BitsmithConfig.from_dict(original).to_dict() == original
    model = AutoModelForCausalLM.from_pretrained(packed)
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == original
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert isinstance(again.model.layers[1].mlp.down_proj, PackedLinear)
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, model(ids()).logits)


def test_dequantize_gives_dense_linears(folders):
    packed, reference = folders
    model = AutoModelForCausalLM.from_pretrained(packed)
    with torch.no_grad():
        before = model(ids()).logits
    model.dequantize()
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.weight,
                               reference.model.layers[0].mlp.down_proj.weight, rtol=0, atol=0)


def test_register_is_idempotent():
    from transformers.quantizers import auto

    register()
    register()
    hf_integration._REGISTERED = False  # as after a reload of this module: the mappings already hold "bitsmith"
    register()
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["bitsmith"] is BitsmithConfig
    assert auto.AUTO_QUANTIZER_MAPPING["bitsmith"] is hf_integration.BitsmithHfQuantizer


def test_quantize_on_load_is_refused(tmp_path):
    tiny_llama(True).save_pretrained(tmp_path / "dense")
    pack_folder(tmp_path / "dense", tmp_path / "packed")
    q = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    register()
    with pytest.raises(BitsmithError, match="does not quantize while loading"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=BitsmithConfig.from_dict(q))


def test_load_helper(folders, tmp_path):
    packed, reference = folders
    model = load(packed, torch_dtype=torch.bfloat16)
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.up_proj, PackedLinear)
    assert layer.mlp.up_proj.scales.dtype == torch.bfloat16 and layer.mlp.up_proj.qweight.dtype == torch.int32
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model = load(packed, device_map="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, reference(ids()).logits, rtol=1e-5, atol=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such folder"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(BitsmithError, match="not both"):
        load(packed, torch_dtype=torch.float32, dtype=torch.float32)


def test_load_refuses_pickle_only_folders(tmp_path):
    model = tiny_llama(True)
    model.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "dense" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        load(tmp_path / "dense")


def test_load_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded("hello world nope")["input_ids"] == [1, 2, 0]
