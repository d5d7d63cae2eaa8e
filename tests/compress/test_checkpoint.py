import json
import struct

import pytest
import torch

from bitsmith.compress.checkpoint import CheckpointReader
from bitsmith.compress.errors import CheckpointError
from tests.conftest import make_tiny_llama


def test_reads_single_file_lazily(tiny_llama):
    r = CheckpointReader(tiny_llama)
    assert "model.embed_tokens.weight" in r
    assert r.tensors["model.embed_tokens.weight"].shape == (128, 64)
    t = r.get("model.layers.0.mlp.down_proj.weight")
    assert t.shape == (64, 96) and t.dtype == torch.bfloat16
    assert r.total_bytes == sum(i.nbytes for i in r.tensors.values())


def test_reads_sharded_with_index(tmp_path):
    path = make_tiny_llama(tmp_path / "sharded", shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    r = CheckpointReader(path)
    files = {i.file for i in r.tensors.values()}
    assert len(files) > 1
    single = CheckpointReader(make_tiny_llama(tmp_path / "single"))
    for name in single.names:
        assert torch.equal(single.get(name), r.get(name))


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        CheckpointReader(tmp_path / "empty")


def test_truncated_file_is_refused(tiny_llama):
    f = tiny_llama / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="outside the file"):
        CheckpointReader(tiny_llama)


def test_lying_header_length_is_refused(tiny_llama):
    f = tiny_llama / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors header"):
        CheckpointReader(tiny_llama)


def test_garbage_header_is_refused(tiny_llama):
    f = tiny_llama / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json at "
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not JSON"):
        CheckpointReader(tiny_llama)


def test_pickle_weights_refused_unless_allowed(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama / "config.json").read_text())
    state = load_file(tiny_llama / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        CheckpointReader(folder)
    r = CheckpointReader(folder, allow_pickle=True)
    assert torch.equal(r.get("lm_head.weight"), state["lm_head.weight"])


def test_index_pointing_to_missing_shard(tmp_path):
    path = make_tiny_llama(tmp_path / "sharded", shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        CheckpointReader(path)
