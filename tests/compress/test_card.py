"""The model card: valid Hub metadata, figures read from the folder (never invented), no local paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bitsmith.compress.card import (MARKER, is_generated_card, parse_front_matter, redact_local_paths,
                                    render_model_card, write_model_card)
from bitsmith.compress.errors import CheckpointError, OutputError

try:
    from . import fakehub
except ImportError:
    import fakehub

make_folder = fakehub.make_folder


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "work" / "tiny-llama-int8")


def card_of(folder: Path, **kw) -> tuple[dict, str, str]:
    path = write_model_card(folder, **kw)
    assert path == folder / "README.md"
    text = path.read_text()
    assert text.startswith("---\n")
    meta_text, body = text[4:].split("\n---\n", 1)
    meta = yaml.safe_load(meta_text)  # the front matter is valid YAML, and a mapping
    assert isinstance(meta, dict)
    return meta, body, text


def test_metadata_and_sections(folder):
    meta, body, text = card_of(folder)
    assert meta == {
        "library_name": "bitsmith",
        "base_model": "tiny-org/tiny-llama",
        "base_model_relation": "quantized",
        "pipeline_tag": "text-generation",
        "tags": ["bitsmith", "quantized", "gwint", "8-bit"],
    }  # no license: none is known, and none is invented
    assert is_generated_card(text) and body.startswith(MARKER)
    assert "[tiny-org/tiny-llama](https://huggingface.co/tiny-org/tiny-llama)" in body
    assert "made with bitsmith 0.1.0" in body
    # what was applied: passes, packed modules with their measured storage, the recipe verbatim
    assert "1. `finequant`: bits=8, group_size=32" in body
    assert "| `gwint` | bits=8, group_size=32, symmetric=true | 14 | 8.50 |" in body  # 8 bits + fp16 scale / 32
    assert "```yaml\npasses:\n  - type: finequant\n" in body
    # sizes from bitsmith.json, and the files as they are
    prov = json.loads((folder / "bitsmith.json").read_text())
    ratio = prov["linear_bytes_before"] / prov["linear_bytes_after"]
    assert prov["linear_bytes_before"] == 36 * 1024  # 2 layers x 9216 weights x 2 bytes
    after = prov["linear_bytes_after"] / 1024
    assert f"| linear layers | 36.00 KiB | {after:.2f} KiB | {ratio:.2f}x smaller |" in body
    assert "(3 files, headers included)" in body
    # nothing measured yet: said so, no numbers
    assert "Not measured yet" in body and "perplexity |" not in body
    # how to load
    assert "pip install bitsmith" in body and "import bitsmith" in body
    assert 'AutoModelForCausalLM.from_pretrained("ORG/NAME")' in body
    assert 'AutoTokenizer.from_pretrained("ORG/NAME")' in body


def test_repo_id_in_snippet_and_title(folder):
    meta, body, _ = card_of(folder, repo_id="acme/tiny-int8")
    assert body.split("\n")[2] == "# tiny-int8"
    assert 'from_pretrained("acme/tiny-int8")' in body and "ORG/NAME" not in body
    with pytest.raises(OutputError, match="not a Hub repo id"):
        write_model_card(folder, repo_id="not an id")


def test_measured_results_are_shown_as_recorded(folder):
    records = [
        {"metric": "perplexity", "text": "/srv/corpora/wiki.test.raw", "tokens": 4096, "window": 512,
         "ppl": 12.3456, "bits_per_char": 0.81234, "date": "2025-01-01"},
        {"metric": "perplexity", "text": "c4.txt", "tokens": 2048, "window": 256, "ppl": 20.0, "date": "2025-01-02"},
    ]
    (folder / "eval_results.json").write_text(json.dumps(records))
    _, body, _ = card_of(folder)
    assert "| perplexity | wiki.test.raw | 4096 | 512 | 12.35 | 0.8123 | 2025-01-01 |" in body
    assert "| perplexity | c4.txt | 2048 | 256 | 20 | - | 2025-01-02 |" in body  # missing figure: '-', not 0
    assert "/srv/corpora" not in body and "Not measured" not in body


def test_license_and_task_carried_from_the_base_card(folder):
    base_card = ("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\nlanguage:\n- en\n"
                 "pipeline_tag: text-generation\nlibrary_name: transformers\nbase_model: someone/else\n"
                 "tags:\n- text-generation-inference\n---\n# Tiny Llama\nBase model card.\n")
    (folder / "README.md").write_text(base_card)
    meta, body, _ = card_of(folder)
    assert meta["license"] == "other" and meta["license_name"] == "tiny-license" and meta["license_link"] == "LICENSE"
    assert meta["language"] == ["en"]
    assert meta["library_name"] == "bitsmith" and meta["base_model"] == "tiny-org/tiny-llama"  # not the base's base
    assert "text-generation-inference" not in meta["tags"] and "Base model card" not in body
    # regenerating from bitsmith's own card keeps what was carried
    meta2, _, _ = card_of(folder)
    assert meta2 == meta
    # an explicit license wins; a license recorded in bitsmith.json is used when nothing else is given
    meta3, _, _ = card_of(folder, license="apache-2.0")
    assert meta3["license"] == "apache-2.0" and "license_name" not in meta3


def test_license_from_provenance(folder):
    prov = json.loads((folder / "bitsmith.json").read_text())
    prov["license"] = "mit"
    (folder / "bitsmith.json").write_text(json.dumps(prov))
    assert card_of(folder)[0]["license"] == "mit"


def test_no_local_paths_reach_the_card(folder, tmp_path):
    calib = tmp_path / "data" / "calib.txt"
    (folder / "recipe.yaml").write_text(
        f"passes:\n  - type: finequant\n    bits: 8\n    calibration: {calib}\n"
        "    targets: ['re:model\\.layers\\.\\d+/mlp']\n# see https://example.org/docs/recipes\n"
    )
    prov = json.loads((folder / "bitsmith.json").read_text())
    prov["base_model"] = str(tmp_path / "models" / "Tiny-Base")  # an engine bug: a full path
    prov["passes"][0]["calibration"] = str(calib)
    (folder / "bitsmith.json").write_text(json.dumps(prov))
    meta, body, text = card_of(folder)
    assert "base_model" not in meta  # not a Hub id: not claimed as one
    assert "`Tiny-Base` (a local checkpoint)" in body
    assert "calibration: <local>/calib.txt" in body
    assert "https://example.org/docs/recipes" in body  # URLs are not paths
    assert str(tmp_path) not in text and "/data/" not in text and str(Path.home()) + "/" not in text


def test_same_folder_same_bytes(folder):
    first = write_model_card(folder).read_bytes()
    assert write_model_card(folder).read_bytes() == first
    assert render_model_card(folder).encode() == first


def test_folder_without_provenance_or_packing(tmp_path):
    folder = make_folder(tmp_path / "plain", packed=False, shards=1)
    (folder / "bitsmith.json").unlink()
    (folder / "recipe.yaml").unlink()
    (folder / "tokenizer_config.json").unlink()
    meta, body, _ = card_of(folder)
    assert meta == {"library_name": "bitsmith", "pipeline_tag": "text-generation", "tags": ["bitsmith"]}
    assert "the base model was not recorded" in body
    assert "Sizes before compression were not recorded." in body
    assert "No packed layers and no passes were recorded." in body
    assert "AutoTokenizer" not in body and "stored packed" not in body


def test_other_architectures_and_markdown_safety(folder):
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (folder / "config.json").write_text(json.dumps(config))
    prov = json.loads((folder / "bitsmith.json").read_text())
    prov["passes"] = [{"type": "block_prune", "note": "a | b\nnext line"}, "deepshape"]
    (folder / "bitsmith.json").write_text(json.dumps(prov))
    meta, body, _ = card_of(folder)
    assert meta["pipeline_tag"] == "fill-mask" and "pruned" in meta["tags"]
    assert "AutoModelForMaskedLM" in body
    assert "1. `block_prune`: note=a \\| b next line" in body and "2. deepshape" in body


def test_unreadable_inputs_are_clear_errors(folder, tmp_path):
    (folder / "bitsmith.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"bitsmith\.json: not valid JSON"):
        write_model_card(folder)
    with pytest.raises(CheckpointError, match="no such folder"):
        write_model_card(tmp_path / "missing")


def test_front_matter_helpers():
    assert parse_front_matter("---\na: 1\n---\nbody\n") == ({"a": 1}, "body\n")
    assert parse_front_matter("no front matter") == ({}, "no front matter")
    assert parse_front_matter("---\n: [bad\n---\nx") == ({}, "---\n: [bad\n---\nx")
    assert not is_generated_card("---\nlibrary_name: bitsmith\n---\n# mine")
    assert redact_local_paths("at /home/me/x.bin and C:\\Users\\me\\y.txt, ~/z.txt, not 1/2 or http://a/b") == (
        "at <local>/x.bin and <local>/y.txt, <local>/z.txt, not 1/2 or http://a/b")


def test_license_section(folder):
    _, body, _ = card_of(folder)
    assert "license was not recorded: check it" in body
    (folder / "LICENSE").write_text("Apache License 2.0 ...")
    (folder / "GEMMA_TERMS.html").write_text("<html>terms</html>")
    meta, body, _ = card_of(folder, license="apache-2.0")
    assert meta["license"] == "apache-2.0"
    assert "License: `apache-2.0`, the base model's." in body
    assert "License files shipped with the weights: `GEMMA_TERMS.html`, `LICENSE`." in body
    assert "not recorded: check" not in body


def test_example_base_model(folder):
    """Example models (bitsmith examples fetch) carry their description and license in bitsmith_example.json."""
    prov = json.loads((folder / "bitsmith.json").read_text())
    prov["base_model"] = "smollm2-135m"
    (folder / "bitsmith.json").write_text(json.dumps(prov))
    (folder / "bitsmith_example.json").write_text(json.dumps(
        {"name": "smollm2-135m", "description": "SmolLM2 135M Instruct, dequantized from Q4_1",
         "license": "Apache-2.0 (SmolLM2 by HuggingFaceTB)", "license_id": "apache-2.0"}))
    meta, body, _ = card_of(folder)
    assert "base_model" not in meta and meta["license"] == "apache-2.0"
    assert "bitsmith's example model `smollm2-135m` (SmolLM2 135M Instruct, dequantized from Q4_1)" in body
    assert "as recorded when it was fetched: Apache-2.0 (SmolLM2 by HuggingFaceTB)." in body


def test_only_license_ids_reach_the_metadata(folder):
    prov = json.loads((folder / "bitsmith.json").read_text())
    prov["license"] = "Apache License, Version 2.0"  # prose: the Hub would reject the card
    (folder / "bitsmith.json").write_text(json.dumps(prov))
    assert "license" not in card_of(folder)[0]
    with pytest.raises(OutputError, match="not a Hub license id"):
        write_model_card(folder, license="Apache 2")
    assert card_of(folder, license="cc-by-nc-4.0")[0]["license"] == "cc-by-nc-4.0"
