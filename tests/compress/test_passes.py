from typing import Literal

import pytest

from bitsmith.compress import passes
from bitsmith.compress.errors import CheckpointError, RecipeError
from bitsmith.compress.recipe import parse_recipe


def fake_entry_points(ours):
    import importlib.metadata as md

    real = md.entry_points

    def entry_points(**kw):
        return ours if kw.get("group") == passes.ENTRY_POINT_GROUP else real(**kw)

    return entry_points


def test_plugin_passes_come_from_entry_points(monkeypatch):
    class FakeEntryPoint:
        name, value = "myplugin", "myplugin:register"

        def load(self):
            def register():
                class Plugin(passes.PassConfig):
                    type: Literal["plugin_noop"] = "plugin_noop"
                    strength: int = 1

                passes.register_pass(Plugin, apply=lambda cfg, state, ctx: state)

            return register

    passes._load_builtin_passes()  # real imports first (triton looks up its own entry points)
    monkeypatch.setattr(passes, "_plugins_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points([FakeEntryPoint()]))
    recipe = parse_recipe("version: 1\npasses:\n  - type: plugin_noop\n    strength: 3\n")
    assert recipe.passes[0].strength == 3
    assert "plugin_noop" in passes.known_passes()


def test_broken_plugin_is_reported(monkeypatch):
    class Broken:
        name, value = "broken", "broken:register"

        def load(self):
            raise ImportError("no module named broken")

    passes._load_builtin_passes()
    monkeypatch.setattr(passes, "_plugins_loaded", False)
    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points([Broken()]))
    with pytest.raises(RecipeError, match="plugin pass 'broken'.*failed to load"):
        passes.known_passes()


def test_same_type_registered_twice_is_refused():
    class A(passes.PassConfig):
        type: Literal["dup_test"] = "dup_test"

    class B(passes.PassConfig):
        type: Literal["dup_test"] = "dup_test"

    passes.register_pass(A, apply=lambda *a: None)
    with pytest.raises(ValueError, match="registered twice"):
        passes.register_pass(B, apply=lambda *a: None)


def test_hub_id_offline_gives_clear_error(monkeypatch, tmp_path):
    from bitsmith.compress.checkpoint import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="cannot be reached|not in the local cache"):
        resolve_model_path("someorg/somemodel")
