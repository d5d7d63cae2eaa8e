"""The decode harness runs every variant on a tiny Llama (CPU, eager) and the packed variants store fewer bytes."""

import json

import pytest
import torch

from bitsmith.kernels import bench_generate


def test_every_variant_decodes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert bench_generate.main(["--shape", "tiny", "--batch", "1", "--batch", "2", "--steps", "2", "--device", "cpu",
                                "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in ("fp16", "w4", "w8") for b in (1, 2)]
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in rows)
    w4 = next(r for r in rows if r["variant"] == "w4")["decoder_linear_bytes"]
    w8 = next(r for r in rows if r["variant"] == "w8")["decoder_linear_bytes"]
    hidden, mlp, layers = 64, 128, 2
    fp16 = 2 * layers * (2 * hidden * hidden + 2 * (hidden // 2) * hidden + 3 * hidden * mlp)
    assert w4 < 0.3 * fp16 and w8 < 0.55 * fp16


def test_quantized_head_variant_and_kernel_categories(tmp_path):
    """w4-h8 packs the lm_head too (int8, one scale per row) and still decodes; kernel names map to categories."""
    out = tmp_path / "rows.json"
    assert bench_generate.main(["--shape", "tiny", "--batch", "1", "--steps", "2", "--device", "cpu",
                                "--variant", "w4-h8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and "error" not in rows[0] and rows[0]["tokens_per_s"] > 0
    model = bench_generate.build_model("tiny", torch.device("cpu"))
    bench_generate.pack_linears(model, 4, 128, head=(8, None))
    assert model.lm_head.params["bits"] == 8 and model.lm_head.params["group_size"] == 64
    cat = bench_generate.kernel_category
    assert cat("_gemv_wide_kernel") == "gwint" and cat("nvjet_hsh_64x8_splitK") == "cublas-gemm"
    assert cat("triton_poi_fused_mul_0") == "other" and cat("flash_fwd_kernel") == "attention"


def test_compiled_decode_step(tmp_path):
    """--compile puts the decode step's forward through torch.compile (here the aot_eager backend, which needs no
    C++ compiler) for the fp16 and packed variants alike; the rows say so."""
    torch._dynamo.reset()
    out = tmp_path / "rows.json"
    assert bench_generate.main(["--shape", "tiny", "--batch", "1", "--steps", "2", "--device", "cpu",
                                "--variant", "fp16", "--variant", "w4", "--compile", "aot_eager",
                                "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["fp16", "w4"]
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["compiled"] == "aot_eager" for r in rows)


def test_fused_projections_same_logits_and_packed_decode(tmp_path):
    """--fuse: q/k/v and gate/up through one concatenated Linear each gives the unfused model's logits (same
    weights, float32); parts called out of order fail loudly; the packed variants pack the fused matrices."""
    model = bench_generate.build_model("tiny", torch.device("cpu"), dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        bench_generate.fuse_projections(model)
        out = model(input_ids=ids).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.linear.weight.shape == (64 + 2 * 32, 64)
    assert model.model.layers[0].mlp.gate_up_proj.sizes == [128, 128]
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="in order"):
        attn.k_proj(x)
    out_json = tmp_path / "rows.json"
    assert bench_generate.main(["--shape", "tiny", "--batch", "1", "--steps", "2", "--device", "cpu", "--fuse",
                                "--variant", "fp16", "--variant", "w4", "--out", str(out_json)]) == 0
    rows = json.loads(out_json.read_text())
    assert all("error" not in r and r["fused"] and r["tokens_per_s"] > 0 for r in rows)
