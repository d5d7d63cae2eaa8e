"""Property-based and fuzz tests: hostile recipes and checkpoint files give a clear error or a defined result."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bitsmith
from bitsmith.compress.checkpoint import CheckpointReader
from bitsmith.compress.errors import BitsmithError, CheckpointError, RecipeError
from bitsmith.compress.recipe import parse_recipe
from tests.conftest import make_tiny_llama

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                         st.text(max_size=12))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                  st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4)), max_leaves=12)
pass_dicts = st.dictionaries(st.sampled_from(["type", "bits", "group_size", "targets", "ignore", "symmetric", "x"]),
                             yaml_values, max_size=5)


@FAST
@given(st.text(max_size=300))
def test_recipe_parser_on_any_text(text):
    try:
        parse_recipe(text, "fuzz.yaml")
    except RecipeError as e:
        assert str(e).startswith("fuzz.yaml")


@FAST
@given(st.dictionaries(st.sampled_from(["version", "name", "passes", "description", "other"]),
                       st.one_of(yaml_values, st.lists(pass_dicts, max_size=3)), max_size=4))
def test_recipe_parser_on_any_structure(data):
    import yaml

    text = yaml.safe_dump(data)
    try:
        parse_recipe(text, "fuzz.yaml")
    except RecipeError as e:
        assert str(e).startswith("fuzz.yaml")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("hostile") / "m", layers=1)
    return path, (path / "model.safetensors").read_bytes()


def _reader_outcome(folder):
    """Open and read every tensor: returns None, or raises CheckpointError. Anything else fails the test."""
    r = CheckpointReader(folder)
    for name in r.names:
        r.get(name)


@FAST
@given(cut=st.integers(0, 10**6))
def test_truncated_anywhere(pristine, tmp_path_factory, cut):
    src, data = pristine
    folder = tmp_path_factory.mktemp("t")
    (folder / "config.json").write_bytes((src / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes(data[: cut % len(data)])
    with pytest.raises(CheckpointError):
        _reader_outcome(folder)


@FAST
@given(pos=st.integers(0, 4000), byte=st.integers(0, 255))
def test_header_byte_flips(pristine, tmp_path_factory, pos, byte):
    src, data = pristine
    folder = tmp_path_factory.mktemp("f")
    (folder / "config.json").write_bytes((src / "config.json").read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    mutated = bytearray(data)
    mutated[pos % (8 + header_len)] = byte
    (folder / "model.safetensors").write_bytes(bytes(mutated))
    try:
        _reader_outcome(folder)  # a flip inside a name or a space can leave a valid file: a defined result
    except CheckpointError:
        pass


def _write_raw(folder, header: dict, data: bytes = b""):
    blob = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("header, data, message", [
    ({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, b"", "outside the file"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 16"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0" * 2, "unknown dtype"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
    ({"w": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed header entry"),
    ({"w": [1, 2, 3]}, b"", "malformed header entry"),
])
def test_lying_headers(tmp_path, header, data, message):
    (tmp_path / "config.json").write_text("{}")
    _write_raw(tmp_path, header, data)
    with pytest.raises(CheckpointError, match=message):
        _reader_outcome(tmp_path)


def test_duplicate_tensor_names_in_header(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    blob = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},' \
           b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 4)
    with pytest.raises(CheckpointError, match="appears twice"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("index", ['[]', '{"weight_map": 3}', '{"weight_map": {"w": "../x.safetensors"}}',
                                   '{"nothing": 1}', "\xff\xfe"])
def test_malformed_index(tmp_path, index):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(index, encoding="latin-1")
    with pytest.raises(CheckpointError, match="index"):
        CheckpointReader(tmp_path)


def test_zero_size_tensor_streams_through(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    save_file({"empty.weight": torch.zeros(0, 8), "lin.weight": torch.randn(16, 32)}, tmp_path / "m" / "model.safetensors")
    bitsmith.compress("int8", tmp_path / "m", tmp_path / "out", progress=False)
    r = CheckpointReader(tmp_path / "out")
    assert r.get("empty.weight").shape == (0, 8) and "lin.qweight" in r


def test_nan_weights_are_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make_tiny_llama(tmp_path / "m", layers=1)
    state = load_file(path / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BitsmithError, match=r"model.layers.0.mlp.up_proj.weight.*1 NaN/Inf"):
        bitsmith.compress("int8", path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_format_name_in_config_is_refused(tmp_path):
    from bitsmith.compress.inspect import inspect_checkpoint

    path = make_tiny_llama(tmp_path / "m", layers=1)
    out = tmp_path / "out"
    bitsmith.compress("int8", path, out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    first = next(iter(cfg["quantization_config"]["modules"]))
    cfg["quantization_config"]["modules"][first]["format"] = "os.system"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown packed format 'os.system'"):
        inspect_checkpoint(out)
