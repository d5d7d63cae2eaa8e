"""--fuse-layer: a Llama whose norms, SiLU-multiply and residual adds run inside its Linears computes the stock
model's logits (float32, dense), and with gwint-packed Linears the fused deep-GEMV path (fp16, one token, Triton
under the interpreter on the CPU) matches the same packed model run unfused."""

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from bitsmith.kernels import bench_generate  # noqa: E402
from bitsmith.kernels.fused_layer import fuse_decoder_layers  # noqa: E402
from tests.kernels.conftest import DEVICE, needs_kernels, rel_error  # noqa: E402


def _randomise_norms(model, gen):
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)


def test_fused_layers_same_logits_dense():
    gen = torch.Generator().manual_seed(0)
    model = bench_generate.build_model("tiny", torch.device("cpu"), dtype=torch.float32)
    _randomise_norms(model, gen)
    ids = torch.randint(0, 256, (2, 5), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        bench_generate.fuse_projections(model)
        fuse_decoder_layers(model)
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    layer = model.model.layers[0]
    assert type(layer).__name__.startswith("Fused") and isinstance(layer.self_attn.o_proj, torch.nn.Identity)
    with pytest.raises(RuntimeError, match="interleaved"):
        layer.mlp.gate_proj(torch.randn(1, 64))
    with pytest.raises(ValueError, match="fuse_projections"):
        fuse_decoder_layers(bench_generate.build_model("tiny", torch.device("cpu"), dtype=torch.float32))


def _packed_fused_tiny(seed: int):
    """The tiny Llama with random norms, fused projections and decoder layers, w4 g128 packed; one random token."""
    gen = torch.Generator().manual_seed(seed)
    model = bench_generate.build_model("tiny", torch.device(DEVICE))
    _randomise_norms(model, gen)
    bench_generate.fuse_projections(model)
    fuse_decoder_layers(model)
    bench_generate.pack_linears(model, 4, 128)
    return model, torch.randint(0, 256, (1, 1), generator=gen).to(DEVICE)


@needs_kernels
def test_fused_layers_packed_one_token(monkeypatch):
    model, ids = _packed_fused_tiny(seed=1)
    with torch.no_grad():
        monkeypatch.setenv("BITSMITH_TRITON", "0")  # every Linear through the exact dequantized weight, unfused
        ref = model(input_ids=ids).logits.float()
        monkeypatch.setenv("BITSMITH_TRITON", "1")  # the fused deep GEMVs (under the interpreter on the CPU)
        calls = []
        from bitsmith.kernels import gwint_triton

        real = gwint_triton.fused_gemv
        monkeypatch.setattr(gwint_triton, "fused_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = model(input_ids=ids).logits.float()
    assert len(calls) == 2 * len(model.model.layers)  # qkv and gate/up (o and down: the residual as a bias)
    assert rel_error(out.cpu(), ref.cpu()) < 1e-2


def test_fuse_layer_option_decodes(tmp_path):
    out = tmp_path / "rows.json"
    assert bench_generate.main(["--shape", "tiny", "--batch", "1", "--steps", "2", "--device", "cpu", "--fuse",
                                "--fuse-layer", "--variant", "fp16", "--variant", "w4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert all("error" not in r and r["fuse_layer"] and r["tokens_per_s"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        bench_generate.main(["--shape", "tiny", "--device", "cpu", "--fuse-layer"])
    # the default: fused layers with --fuse, stock ones without it or with --fuse-layer off
    for extra, fused in (["--fuse"], True), ([], False), (["--fuse", "--fuse-layer", "off"], False):
        assert bench_generate.main(["--shape", "tiny", "--batch", "1", "--steps", "2", "--device", "cpu",
                                    "--variant", "w4", "--out", str(out)] + extra) == 0
        assert [r["fuse_layer"] for r in json.loads(out.read_text())] == [fused]
    # 'both': each variant with the stock layers, then fused; ratios against the fp16 row of the same kind
    assert bench_generate.main(["--shape", "tiny", "--batch", "1", "--steps", "2", "--device", "cpu", "--fuse",
                                "--fuse-layer", "both", "--variant", "fp16", "--variant", "w4", "--out",
                                str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["fuse_layer"]) for r in rows] == [("fp16", False), ("fp16", True), ("w4", False),
                                                              ("w4", True)]
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["speedup_vs_fp16"] > 0 for r in rows)


@needs_kernels
def test_fused_layers_compile_to_one_op_per_linear(monkeypatch):
    """Under torch.compile every fused Linear of a packed model is one opaque `bitsmith::gwint_fused_linear` op
    (4 a layer), and the compiled forward gives the eager numbers."""
    monkeypatch.setenv("BITSMITH_TRITON", "1")
    torch._dynamo.reset()
    model, ids = _packed_fused_tiny(seed=2)
    op = torch.ops.bitsmith.gwint_fused_linear
    calls = []

    def counting_backend(gm, example_inputs):
        calls.extend(n for n in gm.graph.nodes if n.target in (op, op.default))
        return gm.forward

    with torch.no_grad():
        eager = model(input_ids=ids).logits.float()
        out = torch.compile(model, backend=counting_backend)(input_ids=ids).logits.float()
    assert len(calls) == 4 * len(model.model.layers)
    assert rel_error(out.cpu(), eager.cpu()) < 1e-3


def test_fuse_layer_option_as_main_module(tmp_path, monkeypatch):
    """`python -m bitsmith.kernels.bench_generate --fuse --fuse-layer` (its classes then live in __main__)."""
    import runpy
    import sys
    import warnings

    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["bench_generate", "--shape", "tiny", "--batch", "1", "--steps", "2", "--device",
                                      "cpu", "--fuse", "--fuse-layer", "--variant", "w4", "--out", str(out)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        with pytest.raises(SystemExit) as e:
            runpy.run_module("bitsmith.kernels.bench_generate", run_name="__main__")
    assert e.value.code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and "error" not in rows[0] and rows[0]["fuse_layer"]
