"""The merge kind: a TokenMerger's rows reach the LLM in place of its kept tokens, before the LLM and inside it.

The mergers here are for these tests only (not registered): evenly spaced slots survive, every token goes into
the nearest one, and a slot carries its group's mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokred
from tokred.methods.merging import fold_into_kept
from tokred.tokens import Merge, VisionTokens


def even_merge(tokens: VisionTokens, k: int) -> Merge:
    n = len(tokens.span)
    index = torch.linspace(0, n - 1, k).round().long()
    groups = (torch.arange(n)[:, None] - index[None]).abs().argmin(1)  # ties go to the earlier slot
    rows = torch.stack([tokens.embeds[groups == j].mean(0) for j in range(k)])
    return Merge(index, rows, groups)


@dataclass(frozen=True)
class EvenMerge(tokred.TokenMerger):
    name: ClassVar[str] = "even-merge"
    stage: ClassVar[str] = "pre_llm"

    def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
        return even_merge(tokens, k)


@dataclass(frozen=True)
class EvenMergeInside(tokred.TokenMerger, tokred.LLMReducer):
    name: ClassVar[str] = "even-merge-inside"
    stage: ClassVar[str] = "llm"
    layer: int = 1

    def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
        return even_merge(tokens, k)


def layer_inputs(model, adapter, layer: int, inputs) -> list[torch.Tensor]:
    """The hidden states LLM layer `layer` receives, per forward (hooked after tokred's own hooks)."""
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["hidden_states"] if not args else args[0]).clone())

    handle = adapter.layers[layer].register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen


def expected(hidden: torch.Tensor, positions: list[torch.Tensor], keep: float) -> list[torch.Tensor]:
    """Each sample's vision rows after an even merge of its one image, from the full-sequence hidden states."""
    out = []
    for b, pos in enumerate(positions):
        tokens = VisionTokens(tokred.methods.Span("image", pos), hidden[b, pos])
        out.append(even_merge(tokens, EvenMerge(keep=keep).budget(len(pos))).rows)
    return out


MERGERS = pytest.mark.parametrize("method", [EvenMerge(keep=0.25), EvenMergeInside(keep=0.25)], ids=lambda m: m.stage)


@MERGERS
def test_merged_rows_reach_the_llm_in_place_of_the_kept_tokens(tiny, method):
    from tokred.adapters import adapter_for

    adapter, inputs = adapter_for(tiny.model), tiny.batch()
    first = 0 if method.stage == "pre_llm" else method.layer + 1  # the first layer that sees the cut
    (full,) = layer_inputs(tiny.model, adapter, first, inputs)
    with tokred.patched(tiny.model, method):
        (cut,) = layer_inputs(tiny.model, adapter, first, inputs)
        kept = tokred.stats(tiny.model).kept_positions[method.stage]
        index = tiny.model._tokred_session.call.selections[method.stage].index  # new slot -> old position
    image = tiny.model.config.image_token_id
    positions = [(ids == image).nonzero()[:, 0] for ids in inputs["input_ids"]]
    assert [len(k) for k in kept] == [method.budget(len(p)) for p in positions]
    for b, rows in enumerate(expected(full, positions, method.keep)):
        torch.testing.assert_close(cut[b, torch.searchsorted(index[b], kept[b])], rows, rtol=1e-5, atol=1e-5)
        others = index[b][~torch.isin(index[b], positions[b])]  # text (and filler) rows pass unchanged
        torch.testing.assert_close(cut[b, ~torch.isin(index[b], positions[b])], full[b, others])


@MERGERS
def test_generate_without_a_cache_reuses_the_merge(tiny, method):
    inputs = tiny.image()
    with tokred.patched(tiny.model, method):
        runs = [
            tiny.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=use_cache)
            for use_cache in (True, False)
        ]
    assert torch.equal(*runs)


def test_a_malformed_merge_is_named():
    @dataclass(frozen=True)
    class Overlapping(EvenMerge):
        def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
            good = even_merge(tokens, k)
            return Merge(good.index, good.rows, torch.zeros_like(good.groups))

    tokens = VisionTokens(tokred.methods.Span("image", torch.arange(8)), torch.randn(8, 4))
    assert torch.equal(EvenMerge(keep=0.5).select(tokens, 4, torch.Generator()), torch.tensor([0, 2, 5, 7]))
    with pytest.raises(ValueError, match="a merge returned a malformed result: each surviving token must be in its"):
        Overlapping().fold(tokens, 4, torch.Generator()).check(8, 4, 4)
    with pytest.raises(ValueError, match=r"rows must have shape \(4, 5\), got \(4, 4\)"):
        even_merge(tokens, 4).check(8, 4, 5)


def test_fold_joins_each_dropped_token_to_its_most_similar_kept_one_as_a_weighted_mean():
    torch.manual_seed(0)
    embeds, weights, index = torch.randn(12, 6), torch.rand(12) + 0.1, torch.tensor([1, 4, 7, 10])
    merge = fold_into_kept(embeds, index, weights)
    merge.check(12, 4, 6)
    for i in range(12):
        similarity = [torch.cosine_similarity(embeds[i], embeds[j], dim=0) for j in index]
        assert merge.groups[i] == (list(index).index(i) if i in index else int(torch.stack(similarity).argmax()))
    for slot in range(4):
        members = merge.groups == slot
        mean = (embeds[members] * weights[members, None]).sum(0) / weights[members].sum()
        torch.testing.assert_close(merge.rows[slot], mean)
    uniform = fold_into_kept(embeds, index)
    torch.testing.assert_close(uniform.rows[0], embeds[uniform.groups == 0].mean(0))
    weightless = fold_into_kept(embeds, index, torch.zeros(12))  # a group whose weights are all zero is averaged evenly
    torch.testing.assert_close(weightless.rows, uniform.rows)


def test_merge_true_folds_the_dropped_tokens_and_stats_report_the_groups(tiny):
    from tokred.adapters import adapter_for

    method = tokred.Random(keep=0.25, merge=True)
    adapter, inputs = adapter_for(tiny.model), tiny.batch()
    (full,) = layer_inputs(tiny.model, adapter, 0, inputs)
    with tokred.patched(tiny.model, method):
        (cut,) = layer_inputs(tiny.model, adapter, 0, inputs)
        stats = tokred.stats(tiny.model)
        index = tiny.model._tokred_session.call.selections["pre_llm"].index
    with tokred.patched(tiny.model, tokred.Random(keep=0.25)):
        tiny.model(**inputs)
        assert [k.tolist() for k in tokred.stats(tiny.model).kept_positions["pre_llm"]] == [
            k.tolist() for k in stats.kept_positions["pre_llm"]
        ]  # merging changes what the kept slots carry, not which slots are kept
    image = tiny.model.config.image_token_id
    for b, kept in enumerate(stats.kept_positions["pre_llm"]):
        positions = (inputs["input_ids"][b] == image).nonzero()[:, 0]
        merge = fold_into_kept(full[b, positions], torch.searchsorted(positions, kept))
        torch.testing.assert_close(cut[b, torch.searchsorted(index[b], kept)], merge.rows, rtol=1e-5, atol=1e-5)
        groups = stats.merged_groups["pre_llm"][b]
        expected = [positions[merge.groups == slot] for slot in range(len(kept))]
        assert [g.tolist() for g in groups] == [g.tolist() for g in expected if len(g) > 1]
        assert sorted(torch.cat(groups).tolist()) == sorted(set(torch.cat(groups).tolist()))  # disjoint


def test_a_merger_cannot_be_told_not_to_merge():
    with pytest.raises(ValueError, match="EvenMerge always merges; merge=False is not a setting of it"):
        EvenMerge(merge=False)
    with pytest.raises(TypeError, match=r"Random.merge must be True or False, got 'yes'"):
        tokred.Random(merge="yes")
    assert tokred.Config.parse("random:keep=0.25:merge=True") == tokred.Config(tokred.Random(keep=0.25, merge=True))
    assert str(tokred.Config(tokred.Random(merge=True))) == "random:merge=True"
