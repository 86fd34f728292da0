"""Config as one description: every field grouped and described, what is fixed at birth said
once on Config (Model and the home derive from it), flat names kept, retired fields still
accepted from old files."""
import dataclasses
import json
import pathlib
import types
import warnings

import pytest

import molecule_gpt as mg
from molecule_gpt import cli, config, home
from molecule_gpt.generation import SamplingParams

ROOT = pathlib.Path(__file__).resolve().parents[1]

# a valid value different from the default, for every field fixed at birth
OTHER = {"n_layer": 3, "n_embd": 16, "n_head": 2, "block_size": 32, "head_types": ("content", "rrpram"),
         "mlp_activation": "silu", "tie_embeddings": False, "delta_rank": 4, "hybrid_alpha_init": 0.25,
         "init_std": 0.05, "delta_init_std": 0.01}


def test_every_field_has_a_group_and_a_description():
    fields = dataclasses.fields(mg.Config)
    for f in fields:
        assert f.metadata.get("group") in config.GROUPS, f.name
        assert isinstance(f.metadata.get("doc"), str) and len(f.metadata["doc"]) > 10, f.name
        assert f.metadata.get("fixed") in (None, config.SHAPE, config.INIT), f.name
    # the groups partition the fields, each group's fields next to each other in the class
    assert sorted(n for g in config.GROUPS for n in mg.Config.fields_of(g)) == sorted(f.name for f in fields)
    order = [f.metadata["group"] for f in fields]
    assert [g for i, g in enumerate(order) if i == 0 or order[i - 1] != g] == list(config.GROUPS)
    assert "transformer blocks" in mg.Config.describe("n_layer") and "fixed at birth" in mg.Config.describe("n_layer")
    assert "fixed at birth" not in mg.Config.describe("temperature")
    with pytest.raises(KeyError):
        mg.Config.fields_of("nonsense")


def test_fixed_at_birth_is_said_once_on_config():
    shape, birth = mg.Config.shape_fields(), mg.Config.fixed_at_birth()
    assert set(shape) < set(birth) and set(OTHER) == set(birth)
    assert mg.Model._SHAPE_FIELDS == shape
    assert home.FIXED_AT_BIRTH == birth and cli.FIXED_AT_BIRTH is home.FIXED_AT_BIRTH


@pytest.mark.parametrize("name", mg.Config.shape_fields())
def test_a_built_model_refuses_a_change_of_every_shape_field(name):
    model = mg.Model(mg.Config(n_layer=1, n_embd=8, n_head=4, block_size=8, head_types=("content", "hybrid") * 2,
                               delta_rank=2, batch_size=2), 11)
    setattr(model.config, name, OTHER[name])
    with pytest.raises(mg.ConfigError, match=name):
        model.loss([[1, 2, 3]])


@pytest.mark.parametrize("name", mg.Config.fixed_at_birth())
def test_a_home_refuses_a_config_file_changing_a_field_fixed_at_birth(name):
    org = types.SimpleNamespace(config=mg.Config())
    h = home.Home("unused", home.Options({name: OTHER[name]}, dict(home.SETTINGS)))
    with pytest.raises(home.HomeError, match=f"{name}=.*fixed for life"):
        h.apply_config(org)
    h = home.Home("unused", home.Options({"temperature": 0.5, name: getattr(org.config, name)}, dict(home.SETTINGS)))
    h.apply_config(org)  # the value it was born with, and fields that are not fixed, apply
    assert org.config.temperature == 0.5


def test_flat_names_round_trip():
    c = mg.Config(n_layer=3, temperature=0.5, qb_min_bytes=10)
    d = c.to_dict()
    assert d["n_layer"] == 3 and d["temperature"] == 0.5 and d["head_types"] == list(c.head_types)
    assert list(d) == [f.name for f in dataclasses.fields(mg.Config)]
    assert mg.Config.from_dict(json.loads(json.dumps(d))) == c


def test_retired_fields_load_silently(tmp_path):
    for name, value in config.RETIRED_FIELDS.items():
        assert not hasattr(mg.Config(), name)
        assert mg.Config.from_dict({name: value, "n_layer": 3}).n_layer == 3  # strict, yet accepted
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({name: value, "warmup_steps": 5}))
        assert home.load_options(str(path)).config == {"warmup_steps": 5}
    with pytest.raises(mg.ConfigError, match="unknown Config field"):
        mg.Config.from_dict({"min_new_chars_to_trian": 1})
    # a checkpoint written with them in model.config (as the previous release wrote) loads
    # without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        org = mg.Organism.load(ROOT / "tests" / "fixtures" / "organism-v1.ckpt")
    assert org.config.n_embd == 16


def test_sampling_params_take_the_sampling_group():
    c = mg.Config(**{name: getattr(mg.Config(), name) for name in mg.Config.fields_of("sampling")})
    c.temperature, c.top_k, c.entropy_temp_focus = 0.3, 7, 0.6
    p = SamplingParams.from_config(c)
    for name in mg.Config.fields_of("sampling"):
        assert getattr(p, name) == getattr(c, name), name


def test_home_settings_are_one_table(tmp_path):
    """The home's own settings (not Config fields) are one row each: default, test, words, doc;
    the dicts the command line exports are views of it."""
    assert not set(home.SETTING_TABLE) & set(home.CONFIG_FIELDS)
    for name, s in home.SETTING_TABLE.items():
        assert s.valid(s.default) and s.doc, name
        assert cli.SETTINGS[name] == s.default and cli._SETTING_HELP[name] == s.takes
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"keep_checkpoints": -1, "seed": "x"}))
    with pytest.raises(home.HomeError, match=r"'keep_checkpoints' must be an int >= 0.*'seed' must be an int >= 0"):
        home.load_options(str(path))
