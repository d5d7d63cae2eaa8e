"""Parallel sweeps (worker processes, torch.distributed ranks) write the bytes of a single-process run."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import make_tiny_llama

ARGS = ["compress", "int8", "--no-progress", "--shard-size", "20KB"]


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    model = make_tiny_llama(root / "model", layers=3)
    ref = root / "ref"
    r = subprocess.run([sys.executable, "-m", "bitsmith.cli", *ARGS, str(model), "-o", str(ref)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return model, contents(ref)


def test_workers_identical(model_and_reference, tmp_path):
    model, reference = model_and_reference
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bitsmith.cli", *ARGS, "--workers", "2", str(model), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert contents(out) == reference


def test_two_ranks_identical(model_and_reference, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    model, reference = model_and_reference
    out = tmp_path / "out"
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29533", "-m", "bitsmith.cli", *ARGS,
                        str(model), "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert contents(out) == reference


def test_two_ranks_output_exists_stops_cleanly(model_and_reference, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    model, _ = model_and_reference
    (tmp_path / "out").mkdir()
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", "29534", "-m", "bitsmith.cli", *ARGS,
                        str(model), "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "output folder exists" in r.stderr
