"""The background read-ahead gives the same tensors, in any order of asking, within its memory budget."""

import random
import threading

import pytest
import torch
from safetensors.torch import save_file

from bitsmith.compress.checkpoint import CheckpointReader
from bitsmith.compress.readahead import ReadAhead


@pytest.fixture()
def folder(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i:02d}": torch.randn(int(torch.randint(1, 200, (1,), generator=g)), 64, generator=g)
               for i in range(30)}
    tensors["empty"] = torch.zeros(0, 4)
    (tmp_path / "config.json").write_text("{}")
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, tensors


@pytest.mark.parametrize("max_bytes", [1, 40_000, 10**9])
def test_same_tensors_in_order(folder, max_bytes):
    path, tensors = folder
    r = CheckpointReader(path)
    names = sorted(tensors)
    r.read_ahead(names, max_bytes)
    for n in names:
        assert torch.equal(r.get(n), tensors[n])
    r.close()


def test_out_of_order_and_repeated_asks_fall_back_to_plain_reads(folder):
    path, tensors = folder
    r = CheckpointReader(path)
    names = sorted(tensors)
    r.read_ahead(names, 60_000)
    asks = names + random.Random(1).sample(names, len(names))  # in order once, then shuffled (all misses)
    for n in asks:
        assert torch.equal(r.get(n), tensors[n])
    r.close()
    assert not [t for t in threading.enumerate() if t.name == "bitsmith-read-ahead"]


def test_budget_is_respected():
    sizes = {f"n{i}": 100 for i in range(20)}
    peak = [0]
    held = []

    def read(name, files):
        held.append(name)
        return torch.zeros(1)

    ahead = ReadAhead(list(sizes), sizes.__getitem__, read, max_bytes=250)
    for n in sizes:
        assert ahead.take(n) is not None
        # at most 2 (250 // 100) tensors were read ahead of the one just taken
        peak[0] = max(peak[0], len(held) - (list(sizes).index(n) + 1))
    ahead.close()
    assert held == list(sizes) and peak[0] <= 2


def test_a_failing_read_stops_the_thread_and_the_caller_reads_itself():
    names = [f"n{i}" for i in range(10)]

    def read(name, files):
        if name == "n3":
            raise OSError("disk gone")
        return torch.full((1,), float(names.index(name)))

    ahead = ReadAhead(names, lambda n: 4, read, max_bytes=10**6)
    got = [ahead.take(n) for n in names]
    ahead.close()
    assert [float(t) for t in got[:3]] == [0.0, 1.0, 2.0]
    assert got[3:] == [None] * 7  # after the failure: plain reads by the caller
