"""Config's one text form: parsed and printed the same way by patch(), tokred eval, the plugin and the demo."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

import tokred
from tokred import Config, FastV, KVScheme, Random
from tokred.config import schemes
from tokred.eval import grid
from tokred.methods.base import METHODS, register


@pytest.mark.parametrize(
    "config",
    [
        *tokred.PRESETS.values(),
        Config(prune=[FastV(layer=3, keep=0.2), Random(keep_tokens=12, seed=7)]),
        Config(prune=Random(keep=1.0)),
        Config(prune=tokred.PyramidDrop(layers=(1, 5, 9), keep=0.2)),
    ],
    ids=str,
)
def test_text_round_trips(config):
    assert Config.parse(str(config)) == config
    assert "," not in str(config) and " " not in str(config)


def test_text_shows_only_what_differs_from_the_defaults_in_pipeline_order():
    config = Config(prune=[FastV(layer=3, keep=0.25), Random(seed=7)])
    assert str(config) == "random:seed=7+fastv:keep=0.25:layer=3"
    assert str(Config()) == "none" and str(tokred.PRESETS["fastv-25"]) == "fastv:keep=0.25"
    assert Config.parse("fastv") == Config(prune=FastV()) and Config.parse("random-50") == tokred.PRESETS["random-50"]
    assert Config.parse("random:keep_tokens=None") == Config(prune=Random())


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (
            "prumerge:keep=0.5",
            ValueError,
            r"unknown preset or method 'prumerge'.*fastv-25.*methods are: cdpruner, dart",
        ),
        ("fastv:lyr=2", ValueError, r"fastv has no field 'lyr'.*fields are: keep, keep_tokens, merge, mass, keep_"),
        ("fastv:layer", ValueError, r"fastv has no field 'layer'"),
        ("fastv:layer=2.5", ValueError, r"FastV.layer must be an integer"),
        ("random:keep=2", ValueError, r"keep must be in \(0, 1\]"),
        ("fastv+fastv:keep=0.5", ValueError, r"two methods for stage 'llm'"),
        ("pdrop:layers=4/2", ValueError, r"PyramidDrop.layers must be strictly ascending, got \(4, 2\)"),
        ("pdrop:layers=1/x", ValueError, r"PyramidDrop.layers must be an integer >= 0, got 'x'"),
        ("pdrop+fastv", ValueError, r"two methods for stage 'llm'"),
    ],
)
def test_bad_text_says_what_exists(text, error, match):
    with pytest.raises(error, match=match):
        Config.parse(text)


def test_every_entry_point_takes_the_text(tiny):
    inputs = tiny.batch()
    kept = {}
    for config in ("fastv:layer=1:keep=0.25", FastV(layer=1, keep=0.25)):
        with tokred.patched(tiny.model, config):
            tiny.model(**inputs)
            kept[str(config)] = [p.tolist() for p in tokred.stats(tiny.model).kept_positions["llm"]]
    assert len({str(v) for v in kept.values()}) == 1
    (_, setting) = grid(recipes=["fastv:layer=1:keep=0.25"])
    assert setting.config == Config(prune=FastV(layer=1, keep=0.25))
    assert (setting.name, setting.method, setting.keep) == ("fastv:layer=1:keep=0.25", "fastv", 0.25)


@dataclass(frozen=True)
class ToyKV(KVScheme):
    """A KV scheme for these tests only (registered per test): the recipe text of a scheme with a field."""

    bits: int = 4


@pytest.fixture
def toy_kv(monkeypatch):
    monkeypatch.setattr(ToyKV, "name", "toykv", raising=False)
    monkeypatch.setattr(ToyKV, "stage", "kv", raising=False)
    monkeypatch.setitem(METHODS, "toykv", ToyKV)
    return ToyKV


def test_kv_and_weights_take_their_own_stage(toy_kv):
    one_list = Config(prune=[toy_kv(bits=2), Random(keep=0.5)])
    fields = Config(prune=Random(keep=0.5), kv=toy_kv(bits=2))
    assert one_list == fields and one_list.kv == toy_kv(bits=2) and one_list.prune == (Random(keep=0.5),)
    assert list(fields.methods) == ["pre_llm", "kv"] and fields.weights is None
    assert str(fields) == "random+toykv:bits=2" and Config.parse(str(fields)) == fields
    assert Config(prune=Random(keep=0.5)).with_schemes(kv="toykv:bits=2") == fields
    assert schemes("kv") == ("none", "int8", "kivi", "toykv", "vidkv")
    assert schemes("weights") == ("none", "layerbits", "uniform_bits")
    with pytest.raises(TypeError, match=r"Config.kv takes a method of stage 'kv'"):
        Config(kv=Random())
    with pytest.raises(ValueError, match="two methods for stage 'kv'"):
        Config(prune=toy_kv(), kv=toy_kv(bits=2))
    with pytest.raises(ValueError, match=r"unknown kv scheme 'random'; kv schemes are: none, int8, kivi, toykv"):
        Config().with_schemes(kv="random")


def test_methods_register_only_as_their_stage_takes():
    with pytest.raises(TypeError, match="a method for stage 'kv' must be a KVScheme, not Random"):
        register("random-kv", stage="kv")(Random)
    with pytest.raises(TypeError, match="a method for stage 'pre_llm' must be a TokenReducer, not ToyKV"):
        register("toy-pre", stage="pre_llm")(ToyKV)
    assert "random-kv" not in METHODS and "toy-pre" not in METHODS


def test_auto_budgets_are_checked_where_they_are_set():
    method = tokred.FastV(keep="auto", mass=0.8, keep_min=0.1, keep_max=0.5)
    assert tokred.Config.parse(str(tokred.Config(method))) == tokred.Config(method)
    assert str(tokred.Config(method)) == "fastv:keep=auto:mass=0.8:keep_min=0.1:keep_max=0.5"
    for kwargs, error, match in (
        ({"keep": "auto", "keep_min": 0.6, "keep_max": 0.3}, ValueError, r"keep_min=0.6 is above keep_max=0.3"),
        ({"keep": "auto", "mass": 1.5}, ValueError, r"FastV.mass must be a number in \(0, 1\], got 1.5"),
        ({"keep": "auto", "keep_tokens": 4}, ValueError, "leave keep_tokens unset"),
        ({"keep": 0.5, "mass": 0.5}, ValueError, "apply only with keep='auto'"),
        ({"keep": "most"}, TypeError, r"keep must be a number in \(0, 1\] or 'auto', got 'most'"),
    ):
        with pytest.raises(error, match=match):
            tokred.FastV(**kwargs)
    with pytest.raises(ValueError, match="Random has no importance scores to size keep='auto' by; methods that do: "):
        tokred.Random(keep="auto")


def test_a_path_keeps_its_slashes_and_a_tuple_field_splits_on_them():
    config = Config.parse("layerbits:calibration=/tmp/run/calibration.json:candidates=16/2/4")
    assert config.weights.calibration == "/tmp/run/calibration.json" and config.weights.candidates == (2, 4, 16)
    assert Config.parse(str(config)) == config
