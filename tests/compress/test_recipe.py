import pytest

from bitsmith.compress.errors import RecipeError
from bitsmith.compress.recipe import bundled_recipes, load_recipe, parse_recipe

GOOD = """\
version: 1
name: test
passes:
  - type: finequant
    bits: 4
    group_size: 64
"""


def test_parses_and_round_trips():
    r = parse_recipe(GOOD, "r.yaml")
    assert r.name == "test" and r.passes[0].bits == 4 and r.passes[0].group_size == 64
    again = parse_recipe(r.to_yaml(), "again.yaml")
    assert again.passes == r.passes


def test_bundled_recipe_by_name():
    assert "int8" in bundled_recipes()
    r = load_recipe("int8")
    assert r.passes[0].type == "finequant" and r.passes[0].bits == 8


def test_unknown_bundled_name_suggests():
    with pytest.raises(RecipeError, match="Did you mean: int8"):
        load_recipe("int9")


def test_malformed_yaml_names_the_line():
    with pytest.raises(RecipeError, match=r"r.yaml:5: malformed YAML: .*flow sequence at line 4"):
        parse_recipe("version: 1\npasses:\n  - type: finequant\n    bits: [4\n", "r.yaml")


def test_unknown_pass_type_lists_known():
    with pytest.raises(RecipeError, match=r"r.yaml:3: passes\[0\].type: unknown pass type 'finequant2'.*finequant"):
        parse_recipe("version: 1\npasses:\n  - type: finequant2\n", "r.yaml")


def test_unknown_key_names_line_key_and_allowed():
    text = "version: 1\npasses:\n  - type: finequant\n    bits: 4\n    grup_size: 64\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "r.yaml")
    msg = str(e.value)
    assert "r.yaml:5" in msg and "grup_size" in msg and "did you mean 'group_size'" in msg and "allowed keys" in msg


def test_mistyped_value_names_line_and_allowed():
    text = "version: 1\npasses:\n  - type: finequant\n    bits: 5\n"
    with pytest.raises(RecipeError) as e:
        parse_recipe(text, "r.yaml")
    assert "r.yaml:4" in str(e.value) and "bits" in str(e.value) and "2, 3, 4 or 8" in str(e.value)


def test_top_level_problems():
    with pytest.raises(RecipeError, match="unknown key 'pases'"):
        parse_recipe("version: 1\npases: []\n", "r.yaml")
    with pytest.raises(RecipeError, match="non-empty list"):
        parse_recipe("version: 1\npasses: []\n", "r.yaml")
    with pytest.raises(RecipeError, match="version: 7 is not supported"):
        parse_recipe("version: 7\npasses: [{type: finequant}]\n", "r.yaml")
    with pytest.raises(RecipeError, match="empty recipe"):
        parse_recipe("", "r.yaml")


def test_overrides_by_key_and_by_index():
    r = parse_recipe(GOOD, "r.yaml", overrides=["bits=8"])
    assert r.passes[0].bits == 8
    r = parse_recipe(GOOD, "r.yaml", overrides=["passes.0.group_size=channel"])
    assert r.passes[0].group_size == "channel"
    with pytest.raises(RecipeError, match="no pass in r.yaml has a key 'donor'"):
        parse_recipe(GOOD, "r.yaml", overrides=["donor=/x"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_recipe(GOOD, "r.yaml", overrides=["bits"])


def test_every_bundled_recipe_validates():
    for name in bundled_recipes():
        assert load_recipe(name).passes
