"""A run killed at any point (SIGKILL) and started again resumes and produces byte-identical output."""

import os
import subprocess
import sys

import pytest

from tests.conftest import make_tiny_llama

CMD = [sys.executable, "-m", "bitsmith.cli", "compress", "int8", "--no-progress", "--shard-size", "12KB"]


def compress(model, out, kill_after=None):
    env = dict(os.environ)
    env.pop("BITSMITH_FAULT_KILL_AFTER_GROUPS", None)
    if kill_after is not None:
        env["BITSMITH_FAULT_KILL_AFTER_GROUPS"] = str(kill_after)
    return subprocess.run(CMD + [str(model), "-o", str(out)], env=env, capture_output=True, text=True)


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_llama(root / "model", layers=3)
    ref = root / "ref"
    r = compress(model, ref)
    assert r.returncode == 0, r.stderr
    return model, contents(ref)


@pytest.mark.parametrize("kill_after", [1, 6, 13, 25])
def test_killed_run_resumes_byte_identical(model_and_reference, tmp_path, kill_after):
    model, reference = model_and_reference
    out = tmp_path / "out"
    killed = compress(model, out, kill_after)
    assert killed.returncode == -9  # SIGKILL: nothing could clean up
    assert not out.exists()  # a killed run never leaves a folder that looks complete
    partial = tmp_path / ".out.bitsmith-partial"
    assert partial.is_dir()
    again = compress(model, out)
    assert again.returncode == 0, again.stderr
    if kill_after >= 13:  # shards of ~12 KB hold a few tensors: by then some shards were complete
        assert "resuming" in again.stderr
    assert not partial.exists()
    assert contents(out) == reference


def test_changed_recipe_does_not_resume(model_and_reference, tmp_path):
    model, reference = model_and_reference
    out = tmp_path / "out"
    assert compress(model, out, 25).returncode == -9
    env = dict(os.environ)
    r = subprocess.run(CMD + [str(model), "-o", str(out), "--set", "bits=4"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "resuming" not in r.stderr
    assert contents(out) != reference


def test_resume_key_follows_the_files_a_recipe_names(tmp_path):
    """A file or folder named in a pass config (soup ingredients, donor, calibration text) is part of the key."""
    import time

    from bitsmith.compress.checkpoint import CheckpointReader
    from bitsmith.compress.pipeline import resume_key
    from bitsmith.compress.recipe import parse_recipe

    model = make_tiny_llama(tmp_path / "model", layers=1)
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text")
    recipe = parse_recipe(f"version: 1\npasses:\n  - {{type: recover, text: {text}}}\n")
    reader = CheckpointReader(model)
    before = resume_key(reader, recipe, 1 << 20)
    assert resume_key(reader, recipe, 1 << 20) == before
    time.sleep(0.01)
    text.write_text("other calibration text, longer")
    assert resume_key(reader, recipe, 1 << 20) != before
