"""Publishing to the Hub: `huggingface_hub`'s real client against a local fake Hub (tests/compress/fakehub.py);
and the folder integrity check that guards every push."""

from __future__ import annotations

import hashlib
import json
import socket
import time
import types
from pathlib import Path

import pytest
import yaml

from bitsmith.compress.errors import BitsmithError, CheckpointError
from bitsmith.compress.hub import find_leaks, local_files, push_folder
from bitsmith.compress.integrity import check_folder, verify_folder

try:
    from . import fakehub
except ImportError:  # tests/ laid out without packages: pytest puts this folder on sys.path
    import fakehub

FakeHub, make_folder = fakehub.FakeHub, fakehub.make_folder


@pytest.fixture(autouse=True)
def client_for_tests(monkeypatch, tmp_path):
    """The client takes the LFS path (no Xet), never sleeps between retries, and never finds a stored token."""
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as http

    from bitsmith.compress import hub as hub_module

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    sleeps = []
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = sleeps.append
    monkeypatch.setattr(http, "time", fake_time)
    monkeypatch.setattr(hub_module, "_sleep", sleeps.append)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    yield sleeps
    if not bars_were_off:
        enable_progress_bars()


@pytest.fixture
def hub():
    with FakeHub() as h:
        yield h


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "out" / "tiny-llama-int8", eval_results=True)


def push(folder, hub, repo="org/tiny", **kw):
    return push_folder(folder, repo, token=kw.pop("token", hub.token), endpoint=kw.pop("endpoint", hub.url), **kw)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_arrived(hub, folder, repo="org/tiny", branch="main"):
    remote = hub.files(repo, branch)
    mine = local_files(folder)
    assert sorted(remote) == sorted(mine) or set(mine) <= set(remote)
    for rel in mine:
        assert remote[rel] == (folder / rel).read_bytes(), rel
    return remote


def pushed_commits(hub, repo="org/tiny"):
    """Commits made by pushes (not the one the Hub makes when it creates a repo)."""
    return [c for c in hub.repos[repo].commits if c["summary"] != "initial"]


def machine_paths(tmp_path):
    return [str(tmp_path), str(Path.home()) + "/", str(Path.cwd()), str(tmp_path.resolve())]


# --- the acceptance path --------------------------------------------------------------------------------------------
def test_push_arrives_complete_with_a_valid_card(hub, folder, tmp_path):
    url = push(folder, hub)
    assert url == f"{hub.url}/org/tiny"
    remote = assert_arrived(hub, folder)
    assert sorted(remote) == sorted(local_files(folder) + [".gitattributes"])  # the Hub's own file is left alone
    assert {"README.md", "config.json", "recipe.yaml", "bitsmith.json", "eval_results.json",
            "model.safetensors.index.json", "model-00002-of-00003.safetensors"} <= set(remote)
    assert len(pushed_commits(hub)) == 1 and not hub.repos["org/tiny"].private
    # the shards went through LFS, each uploaded exactly once
    shard_oids = {sha(d) for p, d in remote.items() if p.endswith(".safetensors")}
    assert {r.path.split("/")[2] for r in hub.lfs_uploads()} == shard_oids
    assert len(hub.lfs_uploads()) == 3
    # the card: YAML front matter that parses, Hub metadata, the repo id in the loading snippet, no machine path
    card = remote["README.md"].decode()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "bitsmith"
    assert meta["base_model"] == "tiny-org/tiny-llama"
    assert meta["pipeline_tag"] == "text-generation"
    assert "bitsmith" in meta["tags"] and "8-bit" in meta["tags"]
    assert 'from_pretrained("org/tiny")' in card and "pip install bitsmith" in card
    assert "12.35" in card  # the measured perplexity from eval_results.json
    assert hub.validated_yaml and hub.validated_yaml[-1]["errors"] == []
    for rel, data in remote.items():
        if rel.endswith((".md", ".json", ".yaml")):
            text = data.decode()
            for p in machine_paths(tmp_path):
                assert p not in text, (rel, p)
            assert hub.token not in text


def test_second_push_of_unchanged_folder_uploads_nothing(hub, folder):
    first = push(folder, hub)
    assert len(first.uploaded) == len(local_files(folder))
    n = len(hub.log)
    second = push(folder, hub)
    assert second == first
    assert second.uploaded == [] and second.deleted == [] and sorted(second.unchanged) == local_files(folder)
    after = hub.log[n:]
    assert [r.method for r in after if r.method == "PUT"] == []
    assert not any("/commit/" in r.path or "/preupload/" in r.path or "lfs" in r.path for r in after)
    assert len(pushed_commits(hub)) == 1


def test_a_new_measurement_updates_only_the_card_and_results(hub, folder):
    push(folder, hub)
    records = json.loads((folder / "eval_results.json").read_text())
    records.append({"metric": "perplexity", "text": "/data/corpora/c4-val.txt", "tokens": 8192, "window": 1024,
                    "ppl": 15.75, "bits_per_char": 0.9, "date": "2025-02-02"})
    (folder / "eval_results.json").write_text(json.dumps(records))
    result = push(folder, hub)
    assert sorted(result.uploaded) == ["README.md", "eval_results.json"]
    assert hub.lfs_uploads().__len__() == 3  # no shard sent again
    card = hub.files("org/tiny")["README.md"].decode()
    assert "15.75" in card and "c4-val.txt" in card and "/data/corpora" not in card
    assert len(pushed_commits(hub)) == 2


# --- failures -------------------------------------------------------------------------------------------------------
def test_server_down_is_a_clear_error(folder):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(BitsmithError, match=rf"cannot reach the Hub at http://127\.0\.0\.1:{port}"):
        push_folder(folder, "org/tiny", token="hf_" + "x" * 34, endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 10


def test_wrong_token_is_not_authorised(hub, folder):
    wrong = "hf_" + "W" * 34
    with pytest.raises(BitsmithError, match="not authorised") as err:
        push(folder, hub, token=wrong)
    msg = str(err.value)
    assert "token was refused" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    assert wrong not in msg
    assert "org/tiny" not in hub.repos


def test_no_token_anywhere_says_so(hub, folder):
    with pytest.raises(BitsmithError, match=r"not authorised .*no token found"):
        push_folder(folder, "org/tiny", endpoint=hub.url)


def test_token_from_the_environment(hub, folder, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.token)
    push_folder(folder, "org/tiny", endpoint=hub.url)
    assert_arrived(hub, folder)


def test_transient_500s_are_retried(hub, folder, client_for_tests):
    shard = folder / "model-00002-of-00003.safetensors"
    hub.fail("PUT", rf"^/lfs/{sha(shard.read_bytes())}$", 500, times=2)  # the client retries the upload
    hub.fail("POST", r"/commit/main$", 503, times=1)  # the client does not retry commits; push_folder does
    push(folder, hub)
    assert_arrived(hub, folder)
    puts = hub.requests("PUT", sha(shard.read_bytes()))
    assert [r.status for r in puts] == [500, 500, 200]
    assert [r.status for r in hub.requests("POST", "/commit/")] == [503, 200]
    assert len(pushed_commits(hub)) == 1
    assert client_for_tests  # waited (without sleeping) between attempts


def test_persistent_500_mid_upload_gives_up_then_resumes(hub, folder):
    shard = folder / "model-00002-of-00003.safetensors"
    oid = sha(shard.read_bytes())
    hub.fail("PUT", rf"^/lfs/{oid}$", 500, times=-1)
    with pytest.raises(BitsmithError, match=r"failed after 3 attempts \(HTTP 500\).*run the same command") as err:
        push(folder, hub, retries=2)
    assert "Traceback" not in str(err.value)
    failed = hub.requests("PUT", oid)
    # retried by the client within each of push_folder's 3 attempts (1 try + 5 retries in huggingface_hub 2.x)
    assert 3 < len(failed) <= 3 * 6
    assert pushed_commits(hub) == []  # nothing half-committed
    assert len(hub.lfs_uploads()) == 2  # the other two shards reached the LFS store

    hub.clear_faults()
    n = len(hub.log)
    push(folder, hub)
    assert_arrived(hub, folder)
    resent = [r for r in hub.log[n:] if r.method == "PUT"]
    assert [r.path for r in resent] == [f"/lfs/{oid}"]  # only the missing shard travelled again


def test_server_errors_while_creating_the_repo_are_retried(hub, folder):
    hub.fail("POST", r"^/api/repos/create$", 502, times=1)
    push(folder, hub)
    assert [r.status for r in hub.requests("POST", "/api/repos/create")] == [502, 200]
    assert_arrived(hub, folder)


def test_multipart_upload_retries_only_the_failed_part(tmp_path):
    folder = make_folder(tmp_path / "m", shards=1)
    with FakeHub(multipart_chunk=4096) as hub:
        oid = sha((folder / "model.safetensors").read_bytes())
        hub.fail("PUT", rf"^/lfs/{oid}/part/3$", 500, times=1)
        push(folder, hub)
        assert_arrived(hub, folder)
        parts = hub.requests("PUT", rf"^/lfs/{oid}/part/")
        by_part = {}
        for r in parts:
            by_part.setdefault(r.path.rsplit("/", 1)[1], []).append(r.status)
        assert len(by_part) > 3 and by_part["3"] == [500, 200]
        assert all(v == [200] for k, v in by_part.items() if k != "3")


def test_existing_repo_is_pushed_into_and_stale_weights_removed(hub, folder):
    hub.add_repo("org/tiny", {"notes.txt": b"kept by the owner\n", "model.safetensors": b"\0old single file"})
    result = push(folder, hub, private=True)
    assert [r.status for r in hub.requests("POST", "/api/repos/create")] == [409]  # exists: pushed into
    remote = assert_arrived(hub, folder)
    assert remote["notes.txt"] == b"kept by the owner\n"
    assert "model.safetensors" not in remote  # would shadow the new sharded layout
    assert result.deleted == ["model.safetensors"]
    assert hub.repos["org/tiny"].private is False  # an existing repo keeps its visibility


def test_private_repo_on_a_branch(hub, folder):
    url = push(folder, hub, private=True, revision="int8")
    assert url == f"{hub.url}/org/tiny/tree/int8"
    repo = hub.repos["org/tiny"]
    assert repo.private is True
    assert list(hub.files("org/tiny", "main")) == [".gitattributes"]
    assert_arrived(hub, folder, branch="int8")
    assert push(folder, hub, revision="int8").uploaded == []  # the branch exists now: pushed into, unchanged


def test_paginated_remote_tree(folder):
    with FakeHub(tree_page=2) as hub:
        push(folder, hub)
        second = push(folder, hub)
        assert second.uploaded == [] and len(second.unchanged) == len(local_files(folder))


def test_bad_repo_ids_are_refused_before_any_request(hub, folder):
    for bad in ("tiny", "org/tiny/extra", "org/ti ny", "org/a--b", "/tiny"):
        with pytest.raises(BitsmithError, match="not a Hub repo id"):
            push(folder, hub, repo=bad)
    assert hub.log == []


def test_broken_folder_is_not_pushed(hub, folder):
    shard = folder / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"(?s)integrity check .*model-00003-of-00003\.safetensors"):
        push(folder, hub)
    assert hub.log == []


def test_secrets_and_paths_are_not_pushed(hub, folder, tmp_path):
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = str(tmp_path / "models" / "base")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    prov = json.loads((folder / "bitsmith.json").read_text())
    prov["note"] = "pushed with hf_" + "S" * 34
    (folder / "bitsmith.json").write_text(json.dumps(prov, indent=2))
    with pytest.raises(CheckpointError, match="refusing to push") as err:
        push(folder, hub)
    msg = str(err.value)
    assert "config.json" in msg and "local path" in msg
    assert "bitsmith.json" in msg and "access token" in msg and "S" * 34 not in msg
    assert hub.log == []


def test_find_leaks_ignores_tokenizer_vocabularies_and_urls(folder):
    (folder / "vocab.json").write_text(json.dumps({"/home/user": 1}))
    (folder / "generation_config.json").write_text(json.dumps({"see": "https://huggingface.co/org/tiny"}))
    assert find_leaks(folder) == []
    (folder / "extra.yaml").write_text("calibration: /home/alice/data/calib.txt\n")
    assert find_leaks(folder) == ["extra.yaml, line 1: a local path (/home/alice/data/calib.txt)"]


def test_a_users_own_readme_is_kept(hub, folder):
    own = "---\nlibrary_name: bitsmith\nlicense: mit\n---\n# My words\n"
    (folder / "README.md").write_text(own)
    push(folder, hub)
    assert hub.files("org/tiny")["README.md"].decode() == own


def test_a_copied_base_card_is_replaced(hub, folder):
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: transformers\n---\n# Base model\n")
    push(folder, hub)
    card = hub.files("org/tiny")["README.md"].decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "bitsmith" and meta["license"] == "apache-2.0"
    assert "# Base model" not in card


# --- integrity --------------------------------------------------------------------------------------------------------
def _rewrite(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _shard_of(folder: Path, name: str) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"][name]


def test_sound_folders_pass(tmp_path):
    assert verify_folder(make_folder(tmp_path / "a")) == []
    assert verify_folder(make_folder(tmp_path / "b", shards=1)) == []
    assert verify_folder(make_folder(tmp_path / "c", packed=False, shards=2)) == []
    check_folder(tmp_path / "a")


def test_index_vs_shards(folder):
    (folder / "model-00001-of-00003.safetensors").unlink()
    (folder / "model-00009-of-00009.safetensors").write_bytes((folder / "model-00002-of-00003.safetensors")
                                                              .read_bytes())
    problems = verify_folder(folder)
    assert any("shard model-00001-of-00003.safetensors is missing" in p for p in problems)
    assert any(p.startswith("model-00009-of-00009.safetensors: a .safetensors file that") for p in problems)


def test_tensor_missing_from_its_shard_and_unlisted_tensor(folder):
    name = "model.layers.0.input_layernorm.weight"
    shard = _shard_of(folder, name)
    _rewrite(shard, lambda t: (t.pop(name), t.__setitem__("stray.weight", t[next(iter(t))].clone())))
    problems = verify_folder(folder)
    assert any(f"tensor {name!r} is listed in {shard.name} but that file does not hold it" in p for p in problems)
    assert any(f"{shard.name}: holds tensor 'stray.weight', which" in p for p in problems)


def test_corrupt_header_is_named_relative(folder):
    shard = folder / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:12] = b"!!!!"
    shard.write_bytes(bytes(data))
    problems = verify_folder(folder)
    assert len(problems) == 1 and problems[0].startswith("model-00002-of-00003.safetensors: corrupt")
    assert str(folder) not in problems[0]


def test_config_modules_vs_tensors(tmp_path):
    import torch

    folder = make_folder(tmp_path / "s", shards=1)
    config = json.loads((folder / "config.json").read_text())
    modules = config["quantization_config"]["modules"]
    modules["model.layers.0.mlp.up_proj"]["out_features"] = 65  # the stored tensors say 64
    modules["model.layers.1.mlp.up_proj"]["format"] = "nosuchformat"
    del modules["model.layers.1.self_attn.q_proj"]  # packed tensors left without an entry
    modules["model.layers.0.self_attn.q_proj"]["symmetric"] = False  # would need zeros
    (folder / "config.json").write_text(json.dumps(config))
    _rewrite(folder / "model.safetensors", lambda t: t.update({
        "model.layers.1.mlp.down_proj.weight": torch.zeros(32, 64, dtype=torch.float16),
        "model.layers.1.mlp.down_proj.bias": torch.zeros(31, dtype=torch.float16),
        "model.layers.1.mlp.gate_proj.extra": torch.zeros(3, dtype=torch.float16),
    }))
    problems = "\n".join(verify_folder(folder))
    assert "model.layers.0.mlp.up_proj.qweight has shape [8, 64], the config implies [8, 65]" in problems
    assert "unknown packed format 'nosuchformat'" in problems
    assert "model.layers.1.self_attn.q_proj: stores packed tensors but has no entry" in problems
    assert "tensor model.layers.0.self_attn.q_proj.zeros is missing" in problems
    assert "model.layers.1.mlp.down_proj.weight is still stored beside the packed tensors" in problems
    assert "model.layers.1.mlp.down_proj.bias has shape [31], expected [32]" in problems
    assert "model.layers.0.mlp.up_proj.scales has shape [1, 64], the config implies [1, 65]" in problems
    assert "unexpected tensor model.layers.1.mlp.gate_proj.extra" in problems
    assert len(verify_folder(folder)) == 8


def test_wrong_dtype_and_both_layouts(tmp_path):
    folder = make_folder(tmp_path / "s", shards=1)
    _rewrite(folder / "model.safetensors",
             lambda t: t.__setitem__("model.layers.0.mlp.up_proj.qweight",
                                     t["model.layers.0.mlp.up_proj.qweight"].to(__import__("torch").int64)))
    from bitsmith.compress.checkpoint import read_safetensors_header

    names = read_safetensors_header(folder / "model.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model.safetensors" for n in names}}))
    problems = "\n".join(verify_folder(folder))
    assert "model.layers.0.mlp.up_proj.qweight is int64, expected int32" in problems
    assert "both model.safetensors and model.safetensors.index.json are present" in problems


def test_side_files_and_missing_config(folder):
    (folder / "eval_results.json").write_text("{not json")
    (folder / "recipe.yaml").write_text("passes: [unclosed\n")
    (folder / "config.json").unlink()
    problems = "\n".join(verify_folder(folder))
    assert "config.json: missing" in problems
    assert "eval_results.json: not valid JSON" in problems
    assert "recipe.yaml: not valid YAML" in problems


def test_check_folder_lists_every_problem(folder):
    for i in (1, 2, 3):
        (folder / f"model-0000{i}-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as err:
        check_folder(folder)
    msg = str(err.value)
    assert "fails its integrity check (3 problems)" in msg
    assert msg.count("\n  - ") == 3
