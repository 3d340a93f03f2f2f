"""Config's one text form: parsed and printed the same way by patch(), tokred eval, the plugin and the demo."""

from __future__ import annotations

import pytest

import tokred
from tokred import Config, FastV, Random
from tokred.eval import grid


@pytest.mark.parametrize(
    "config",
    [
        *tokred.PRESETS.values(),
        Config(prune=[FastV(layer=3, keep=0.2), Random(keep_tokens=12, seed=7)]),
        Config(prune=Random(keep=1.0)),
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
        ("tome:keep=0.5", ValueError, r"unknown preset or method 'tome'.*fastv-25.*methods are: fastv, random"),
        ("fastv:lyr=2", ValueError, r"fastv has no field 'lyr'.*its fields are: keep, keep_tokens, layer"),
        ("fastv:layer", ValueError, r"fastv has no field 'layer'"),
        ("fastv:layer=2.5", ValueError, r"FastV.layer must be an integer"),
        ("random:keep=2", ValueError, r"keep must be in \(0, 1\]"),
        ("fastv+fastv:keep=0.5", ValueError, r"two methods for stage 'llm'"),
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
