"""Every kind of bad input: exit status 2, one message saying what and where, and no output folder."""

import json

import pytest
from click.testing import CliRunner

from bitsmith.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def bad(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: "), result.output
    for f in fragments:
        assert f in result.output, (f, result.output)


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_compress_ok_and_inspect(tiny_llama, tmp_path):
    out = tmp_path / "out"
    r = run("compress", "int8", tiny_llama, "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "passes[0] finequant: 14 tensors changed" in r.output and "skipped by passes[0]: lm_head" in r.output
    r = run("inspect", out, "--json")
    info = json.loads(r.output)
    rows = {m["module"]: m for m in info["modules"]}
    assert rows["model.layers.0.mlp.down_proj"]["format"] == "gwint" and rows["lm_head"]["format"] == "dense-bfloat16"
    assert info["packed_modules"] == 14


def test_plan_reads_no_weights_writes_nothing(tiny_llama, tmp_path):
    r = run("compress", "int8", tiny_llama, "-o", tmp_path / "out", "--plan")
    assert r.exit_code == 0 and "14 modules" in r.output and "skipped lm_head" in r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, fragments", [
    ("version: 1\npasses:\n  - type: finequant\n    bits: [4\n", ["r.yaml:5", "malformed YAML"]),
    ("version: 1\npasses:\n  - type: quantize\n", ["r.yaml:3", "unknown pass type 'quantize'", "finequant"]),
    ("version: 1\npasses:\n  - type: finequant\n    bitz: 4\n", ["r.yaml:4", "bitz", "did you mean 'bits'"]),
    ("version: 1\npasses:\n  - type: finequant\n    bits: four\n", ["r.yaml:4", "bits"]),
    ("version: 1\npasses:\n  - type: finequant\n    targets: [Conv2d]\n", ["target 'Conv2d' matches no module",
                                                                            "Linear"]),
])
def test_bad_recipes(tiny_llama, tmp_path, text, fragments):
    recipe = write(tmp_path, text)
    bad(run("compress", recipe, tiny_llama, "-o", tmp_path / "out"), *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_model_folders(tmp_path, tiny_llama):
    bad(run("compress", "int8", tmp_path / "missing", "-o", tmp_path / "out"), "no such folder")
    (tmp_path / "noconfig").mkdir()
    bad(run("compress", "int8", tmp_path / "noconfig", "-o", tmp_path / "out"), "no config.json")
    st = tiny_llama / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    bad(run("compress", "int8", tiny_llama, "-o", tmp_path / "out"), "model.safetensors", "truncated or corrupt")
    assert not (tmp_path / "out").exists()


def test_shape_contradicts_config(tiny_llama, tmp_path):
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["vocab_size"] = 100
    (tiny_llama / "config.json").write_text(json.dumps(cfg))
    bad(run("compress", "int8", tiny_llama, "-o", tmp_path / "out"), "model.embed_tokens.weight", "[128, 64]")
    assert not (tmp_path / "out").exists()


def test_output_exists(tiny_llama, tmp_path):
    (tmp_path / "out").mkdir()
    bad(run("compress", "int8", tiny_llama, "-o", tmp_path / "out"), "exists", "--overwrite")


def test_disk_full(tiny_llama, tmp_path, monkeypatch):
    import errno

    from bitsmith.compress import writer

    def full(self, name, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._Shard, "add", full)
    bad(run("compress", "int8", tiny_llama, "-o", tmp_path / "out"), "disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_unwritable_output(tiny_llama, tmp_path, monkeypatch):
    from pathlib import Path

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", denied)
    bad(run("compress", "int8", tiny_llama, "-o", tmp_path / "out"), "cannot write the output here")


def test_recipes_commands(tmp_path, tiny_llama):
    r = run("recipes", "list")
    assert r.exit_code == 0 and "int8" in r.output
    r = run("recipes", "show", "int8")
    assert r.exit_code == 0 and "type: finequant" in r.output
    r = run("recipes", "validate", "int8", "--model", tiny_llama)
    assert r.exit_code == 0 and "ok" in r.output and "14 modules" in r.output
    bad(run("recipes", "validate", write(tmp_path, "version: 1\npasses:\n  - type: nope\n")), "unknown pass type")
    bad(run("recipes", "show", "no-such-recipe"), "not a bundled recipe")


def test_bench_commands_hand_their_options_to_the_harness(tmp_path):
    """`bitsmith bench generate/kernels` pass every option (--help included) to the harnesses' own parsers."""
    import torch

    out = tmp_path / "rows.json"
    r = run("bench", "generate", "--shape", "tiny", "--batch", "1", "--steps", "2", "--device", "cpu",
            "--variant", "fp16", "--fuse", "--out", out)
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert rows[0]["shape"] == "tiny" and rows[0]["fused"] and rows[0]["tokens_per_s"] > 0
    for cmd, flag in (("generate", "--compile"), ("kernels", "--shapes")):  # the harness's own usage
        r = run("bench", cmd, "--help")
        assert r.exit_code == 0 and flag in r.output, r.output
    if not torch.cuda.is_available():  # the kernel benchmark needs a GPU and says so
        r = run("bench", "kernels", "--no-bench", "--out", tmp_path / "k")
        assert r.exit_code == 2
