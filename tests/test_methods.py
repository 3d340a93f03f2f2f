"""Conformance: every registered method (tokred.METHODS, each at its `example()` setting) on every family.

A new method is tested here by registering it. Every method: idle identity and an exact unpatch; token
reducers (selecting or merging) also: exact budget counts, generate, and the same choice alone and in a padded
batch.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EXAMPLES, REDUCERS, serve

import tokred

METHODS = pytest.mark.parametrize("method", list(EXAMPLES.values()), ids=list(EXAMPLES))
REDUCING = pytest.mark.parametrize("method", list(REDUCERS.values()), ids=list(REDUCERS))


def vision_counts(tiny, inputs) -> list[int]:
    return (inputs["input_ids"] == tiny.model.config.image_token_id).sum(1).tolist()


def cut_names(tiny, method) -> list[str]:
    """The stats stages a reducer's cuts record, in order: an llm method's earlier cuts are "llm@K"."""
    depth = len(tiny.model.model.language_model.layers)
    earlier = method.cuts(depth)[:-1] if isinstance(method, tokred.LLMReducer) else ()
    return [f"llm@{k}" for k in earlier] + [method.stage]


@METHODS
def test_idle_is_bit_identical(tiny, method):
    inputs = tiny.batch()
    stock = tiny.model(**inputs).logits
    with tokred.patched(tiny.model, method.as_idle()):
        assert torch.equal(tiny.model(**inputs).logits, stock)
        assert set(tokred.stats(tiny.model).vision_tokens) == {"input"}  # the stage did not run


@REDUCING
def test_budget_counts_are_exact(tiny, method):
    serve(tiny, method)
    inputs = tiny.batch()
    n = vision_counts(tiny, inputs)
    for setting, expected in (
        (method, [method.budget(x) for x in n]),
        (dataclasses.replace(method, keep_tokens=3), [3, 3]),
    ):
        with tokred.patched(tiny.model, setting):
            tiny.model(**inputs)
            stats = tokred.stats(tiny.model)
        assert list(stats.vision_tokens) == ["input", *cut_names(tiny, method)], setting
        assert stats.vision_tokens["input"] == n and stats.vision_tokens[method.stage] == expected, setting
        counts = torch.tensor(list(stats.vision_tokens.values()))  # (stages, samples): no cut adds tokens
        assert bool((counts.diff(dim=0) <= 0).all()), counts
        for b, kept in enumerate(stats.kept_positions[method.stage]):
            assert bool((inputs["input_ids"][b, kept] == tiny.model.config.image_token_id).all())


@REDUCING
def test_generate_runs_and_shortens_the_cache(tiny, method):
    serve(tiny, method)
    inputs = tiny.batch()
    steps = 3
    stock = tiny.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    with tokred.patched(tiny.model, method):
        ids = tiny.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        kept = tokred.stats(tiny.model).vision_tokens[method.stage]
    assert ids.shape == stock.shape and torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert kept == [method.budget(x) for x in vision_counts(tiny, inputs)]


@REDUCING
def test_a_samples_selection_is_the_same_alone_and_batched(tiny, method):
    """What a sample keeps depends on it alone, not on the other samples (or padding) of its batch."""
    serve(tiny, method)
    batch = tiny.batch()
    with tokred.patched(tiny.model, method):
        tiny.model(**batch)
        together = tokred.stats(tiny.model).kept_positions[method.stage]
        for b, (text, image) in enumerate(tiny.samples()):
            alone = tiny.processor(images=[image], text=[text], return_tensors="pt")
            tiny.model(**alone)
            (kept,) = tokred.stats(tiny.model).kept_positions[method.stage]
            padding = int((1 - batch["attention_mask"][b]).sum())
            assert (together[b] - padding).tolist() == kept.tolist(), b


@METHODS
def test_unpatch_is_exact(tiny, method):
    serve(tiny, method)
    inputs = tiny.image()
    stock = tiny.model(**inputs).logits
    modules = {name: (dict(m._forward_pre_hooks), sorted(vars(m))) for name, m in tiny.model.named_modules()}
    tokred.patch(tiny.model, method)
    if isinstance(method, tokred.TokenReducer):
        assert tiny.model(**inputs).logits.shape[1] < stock.shape[1]
    tokred.unpatch(tiny.model)
    assert {name: (dict(m._forward_pre_hooks), sorted(vars(m))) for name, m in tiny.model.named_modules()} == modules
    assert torch.equal(tiny.model(**inputs).logits, stock)
