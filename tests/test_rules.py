"""Each method's defining rule on plain tensors: the property that makes it that method, and agreement with a
reference written from its paper's definition (deliberate differences are in the methods' docstrings)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import tokred
from tokred.methods.cdpruner import conditional_kernel, greedy_map, relevance
from tokred.methods.dart import least_duplicated
from tokred.methods.divprune import max_min_diverse
from tokred.methods.mustdrop import alike_windows, dual_attention_order
from tokred.methods.sparsevlm import raters
from tokred.methods.tome import bipartite_merge, merge_down
from tokred.methods.visionzip import zip_tokens
from tokred.methods.vispruner import deduplicate
from tokred.tokens import Span, VisionTokens


def tokens(embeds: torch.Tensor, **signals) -> VisionTokens:
    return VisionTokens(Span("image", torch.arange(len(embeds))), embeds, **signals)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(x, dim=-1)
    return 1 - unit @ unit.T


def min_pairwise(x: torch.Tensor, index: torch.Tensor) -> float:
    d = cosine_distance(x[index])
    return float(d[~torch.eye(len(index), dtype=torch.bool)].min())


def random_subsets(n: int, k: int, count: int = 50) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randperm(n, generator=g)[:k].sort().values for _ in range(count)]


# -- DivPrune -------------------------------------------------------------------------------------------------
def test_divprune_follows_the_max_min_greedy_of_its_definition():
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    d = cosine_distance(x)
    reference = [max(range(40), key=lambda i: min(float(d[i, j]) for j in range(40) if j != i))]
    while len(reference) < 10:
        rest = [i for i in range(40) if i not in reference]
        reference.append(max(rest, key=lambda i: min(float(d[i, j]) for j in reference)))
    assert max_min_diverse(x, 10).tolist() == reference


def test_divprune_keeps_a_more_diverse_set_than_random():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2))
    kept = tokred.DivPrune().select(tokens(x), 8, torch.Generator())
    assert min_pairwise(x, kept) > max(min_pairwise(x, r) for r in random_subsets(64, 8))


def test_divprune_never_repeats_a_token_among_duplicates():
    x = torch.ones(6, 4)  # every distance zero
    assert sorted(max_min_diverse(x, 4).tolist()) == sorted(set(max_min_diverse(x, 4).tolist()))


# -- DART -----------------------------------------------------------------------------------------------------
def test_dart_drops_the_duplicates_of_its_pivots_first():
    g = torch.Generator().manual_seed(3)
    distinct = torch.randn(6, 8, generator=g)
    x = torch.cat([distinct, distinct[2:3].expand(4, 8)])  # tokens 6..9 copy token 2
    norms = torch.arange(10.0)
    norms[2] = 100.0  # token 2 is the pivot
    kept = tokred.DART(pivots=1).select(tokens(x, key_norms=norms), 6, torch.Generator())
    assert kept.tolist() == [0, 1, 2, 3, 4, 5]


def test_dart_shares_the_budget_among_pivots_as_defined():
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(4))
    norms = torch.rand(30, generator=torch.Generator().manual_seed(5))
    pivots = norms.topk(3).indices
    unit = F.normalize(x, dim=-1)
    reference = set(pivots.tolist())
    for i, p in enumerate(pivots.tolist()):  # 11 more tokens: shares 4, 4, 3
        rest = sorted(set(range(30)) - reference, key=lambda j: float(unit[j] @ unit[p]))
        reference |= set(rest[: (4, 4, 3)[i]])
    assert least_duplicated(x, pivots, 14).tolist() == sorted(reference)
    assert tokred.DART(pivots=3).select(tokens(x, key_norms=norms), 14, torch.Generator()).tolist() == sorted(reference)


# -- CDPruner -------------------------------------------------------------------------------------------------
def test_cdpruner_greedy_map_adds_the_largest_log_determinant_each_step():
    g = torch.Generator().manual_seed(6)
    x, text = torch.randn(20, 8, generator=g), torch.randn(5, 8, generator=g)
    kernel = conditional_kernel(x, text).double()
    reference: list[int] = []
    for _ in range(6):
        rest = [j for j in range(20) if j not in reference]
        reference.append(max(rest, key=lambda j: float(torch.logdet(kernel[reference + [j]][:, reference + [j]]))))
    assert greedy_map(kernel, 6).tolist() == reference
    unit = F.normalize(x, dim=-1)
    r = relevance(x, text)
    torch.testing.assert_close(kernel.float(), r[:, None] * (unit @ unit.T) * r[None])
    assert float(r.max()) == 1.0 and float(r.min()) > 0


def test_cdpruner_keeps_a_set_of_larger_log_determinant_than_random():
    g = torch.Generator().manual_seed(7)
    x, text = torch.randn(48, 8, generator=g), torch.randn(4, 8, generator=g)
    kernel = conditional_kernel(x, text).double()
    kept = tokred.CDPruner().select(tokens(x, context=text), 6, torch.Generator())

    def logdet(index):
        return float(torch.logdet(kernel[index][:, index]))

    assert logdet(kept) > max(logdet(r) for r in random_subsets(48, 6))


def test_cdpruner_weights_the_instruction():
    """The same tokens under two prompts: the kept set follows the text."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(32, 8, generator=g)
    picks = {
        tuple(tokred.CDPruner().select(tokens(x, context=torch.randn(3, 8, generator=g)), 6, torch.Generator()))
        for _ in range(4)
    }
    assert len(picks) > 1


def test_every_rule_keeps_exactly_k_distinct_tokens():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(24, 8, generator=g)
    view = tokens(x, key_norms=torch.rand(24, generator=g), context=torch.randn(3, 8, generator=g))
    for method, k in itertools.product((tokred.DivPrune(), tokred.DART(pivots=4), tokred.CDPruner()), (1, 5, 23)):
        kept = method.select(view, k, torch.Generator())
        assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == k, (method, k)


# -- VisionZip ------------------------------------------------------------------------------------------------
def test_visionzip_keeps_the_most_attended_and_merges_the_rest_into_contextual_tokens():
    g = torch.Generator().manual_seed(10)
    x, scores = torch.randn(24, 8, generator=g), torch.rand(24, generator=g)
    merge = zip_tokens(x, scores, dominant=5, contextual=3)
    merge.check(24, 8, 8)
    top = sorted(scores.topk(5).indices.tolist())
    rest = [i for i in range(24) if i not in top]
    targets = rest[:: len(rest) // 3][:3]
    assert merge.index.tolist() == sorted(top + targets)
    unit = F.normalize(x, dim=-1)
    for slot, token in enumerate(merge.index.tolist()):
        if token in top:
            torch.testing.assert_close(merge.rows[slot], x[token])
            assert (merge.groups == slot).sum() == 1
            continue
        joined = [i for i in rest if i not in targets and max(targets, key=lambda t: float(unit[i] @ unit[t])) == token]
        assert sorted((merge.groups == slot).nonzero()[:, 0].tolist()) == sorted([token, *joined])
        expected = x[token] + (x[joined].mean(0) if joined else 0)
        torch.testing.assert_close(merge.rows[slot], expected)


def test_visionzip_splits_its_budget_and_always_keeps_a_contextual_token():
    g = torch.Generator().manual_seed(11)
    view = tokens(torch.randn(64, 8, generator=g), encoder_scores=torch.rand(64, generator=g))
    for k, dominant in ((16, 13), (2, 1), (1, 0)):
        merge = tokred.VisionZip().fold(view, k, torch.Generator())
        assert len(merge.index) == k
        kept_top = set(view.encoder_scores.topk(dominant).indices.tolist()) if dominant else set()
        assert kept_top <= set(merge.index.tolist())
        assert int((torch.bincount(merge.groups, minlength=k) > 1).sum()) >= 1  # some slot merged others


# -- VisPruner ------------------------------------------------------------------------------------------------
def test_vispruner_deduplicates_as_defined():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(40, 8, generator=g)
    unit = F.normalize(x, dim=-1)
    left = list(range(3, 40))
    while len(left) > 10:  # the rounds, written out
        first, second = left[::2], left[1::2]
        drop = min(8, len(left) - 10, len(first))
        closest = {a: max(float(unit[a] @ unit[b]) for b in second) for a in first}
        kept = sorted(first, key=lambda a: -closest[a])[drop:]
        left = sorted(kept + second)
    assert deduplicate(x, torch.arange(3, 40), 10).tolist() == left


def test_vispruner_drops_duplicates_before_distinct_tokens():
    g = torch.Generator().manual_seed(13)
    distinct = torch.randn(8, 8, generator=g)
    x = torch.cat([distinct[:4].repeat_interleave(2, 0), distinct[4:]])  # tokens 2i and 2i+1 alike, i < 4
    kept = tokred.VisPruner(important=0.0).select(tokens(x, encoder_scores=torch.zeros(12)), 8, torch.Generator())
    assert kept.tolist() == [1, 3, 5, 7, 8, 9, 10, 11]  # one of each pair, and every distinct token
    ranked = tokens(x, encoder_scores=torch.arange(12.0))
    important = tokred.VisPruner(important=0.5).select(ranked, 8, torch.Generator())
    assert {11, 10, 9, 8} <= set(important.tolist())  # the four most attended stay


# -- PyramidDrop ----------------------------------------------------------------------------------------------
def test_pdrop_cuts_a_geometric_series_down_to_the_budget():
    method = tokred.PyramidDrop(keep=0.125)  # the paper's setting: half at each of three cuts
    span = tokens(torch.zeros(576, 4))
    assert [method.count_at(step / 3, span, 576) for step in (1, 2, 3)] == [288, 144, 72]
    odd = tokred.PyramidDrop(layers=(1, 2), keep_tokens=10)
    assert [odd.count_at(step / 2, tokens(torch.zeros(90, 4)), 90) for step in (1, 2)] == [30, 10]
    assert tokred.PyramidDrop(layers=(3,), keep=0.3).count_at(1.0, span, 576) == tokred.FastV(keep=0.3).budget(576)
    scores = torch.tensor([5.0, 1.0, 4.0, 0.5, 3.0])
    kept = method.select(tokens(torch.zeros(5, 4), scores=scores), 3, torch.Generator())
    assert kept.tolist() == [0, 2, 4]  # the most attended, in sequence order
    auto = tokred.PyramidDrop(keep="auto", mass=0.5, keep_min=0.2)
    assert auto.count_at(0.5, tokens(torch.zeros(5, 4), scores=scores), 64) == 2  # this layer's mass: 5 + 4 of 13.5


def test_pdrop_splits_the_llm_into_four_stages_by_default():
    method = tokred.PyramidDrop()
    assert [method.cuts(depth) for depth in (32, 28, 4, 3, 2)] == [(7, 15, 23), (6, 13, 20), (0, 1, 2), (0, 1), (0,)]
    assert tokred.PyramidDrop(layers=(2, 5)).cuts(32) == (2, 5)


# -- SparseVLM ------------------------------------------------------------------------------------------------
def test_sparsevlm_raters_are_the_text_most_relevant_to_the_image():
    g = torch.Generator().manual_seed(21)
    image, text = torch.randn(12, 8, generator=g), torch.randn(6, 8, generator=g)
    relevance = torch.stack([(image @ text.T)[i].softmax(0) for i in range(12)]).mean(0)  # per vision token
    assert raters(image, text).tolist() == (relevance > relevance.mean()).tolist()
    assert raters(image, torch.zeros(4, 8)).all()  # no text stands out: every one rates


def test_sparsevlm_scores_by_the_raters_after_the_image_only():
    g = torch.Generator().manual_seed(22)
    embeds, context = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g)
    attention = torch.rand(4, 5, generator=g)
    attention[0] = 0  # a token before the image sees none of it
    view = tokens(embeds, context=context, text_attention=attention)
    chosen = raters(embeds, context[1:])
    expected = attention[1:][chosen].mean(0).topk(2).indices.sort().values
    assert tokred.SparseVLM().select(view, 2, torch.Generator()).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="needs text after the image"):
        tokred.SparseVLM().select(tokens(embeds, context=context, text_attention=torch.zeros(4, 5)), 2, None)


# -- ToMe -----------------------------------------------------------------------------------------------------
def tome_round(x: torch.Tensor, sizes: torch.Tensor, r: int, protect_first: bool):
    """Bipartite soft matching for one sample, written out: A = even places, B = odd; the r A tokens with the
    most similar best B match merge into it as size-weighted means; survivors keep their order."""
    a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    unit = F.normalize(x, dim=-1)
    best = {i: max(b, key=lambda j: float(unit[i] @ unit[j])) for i in a}
    score = {i: float(unit[i] @ unit[best[i]]) for i in a if not (protect_first and i == 0)}
    merging = sorted(score, key=lambda i: -score[i])[:r]
    groups = {j: [j] for j in range(len(x)) if j not in merging}
    for i in merging:
        groups[best[i]].append(i)
    survivors = sorted(groups)
    weights = [sizes[groups[j]] for j in survivors]
    rows = torch.stack([(x[groups[j]] * w[:, None]).sum(0) / w.sum() for j, w in zip(survivors, weights, strict=True)])
    return rows, torch.stack([w.sum() for w in weights]), survivors, groups


def test_tome_round_is_bipartite_soft_matching():
    g = torch.Generator().manual_seed(31)
    x, sizes = torch.randn(2, 11, 6, generator=g), torch.tensor([[1.0, 2, 1, 3, 1, 1, 2, 1, 1, 1, 4]] * 2)
    for protect in (False, True):
        rows, new_sizes, into, survivors = bipartite_merge(x, x, sizes, 4, protect)
        for s in range(2):
            want_rows, want_sizes, want_survivors, groups = tome_round(x[s], sizes[s], 4, protect)
            torch.testing.assert_close(rows[s], want_rows)
            assert new_sizes[s].tolist() == want_sizes.tolist()
            assert survivors[s].tolist() == want_survivors
            assert all(int(into[s, i]) == want_survivors.index(j) for j, members in groups.items() for i in members)
        if protect:
            assert int(survivors[0, 0]) == 0 and float(new_sizes[0, 0]) == 1.0  # [CLS] stands alone


def test_tome_merges_down_to_exactly_k_keeping_every_token_once():
    g = torch.Generator().manual_seed(32)
    x = torch.randn(1, 40, 5, generator=g)
    merged, sizes, into, origin = merge_down(x, x, torch.ones(1, 40), 3)
    assert merged.shape == (1, 3, 5) and sizes.sum() == 40
    assert torch.bincount(into[0], minlength=3).tolist() == sizes[0].long().tolist()
    assert into[0, origin[0]].tolist() == [0, 1, 2]  # each slot's surviving token is in it
    for slot in range(3):  # a slot holds the plain mean of its members (sizes start at one)
        torch.testing.assert_close(merged[0, slot], x[0, into[0] == slot].mean(0), rtol=1e-5, atol=1e-6)
    fold = tokred.ToMe(keep=0.1).fold(tokens(x[0]), 3, torch.Generator())
    assert fold.index.tolist() == origin[0].tolist() and fold.groups.tolist() == into[0].tolist()


# -- MustDrop -------------------------------------------------------------------------------------------------
def test_mustdrop_folds_the_windows_whose_tokens_agree():
    g = torch.Generator().manual_seed(41)
    x = torch.randn(1 * 4 * 6, 8, generator=g)  # a 4x6 grid: six 2x2 windows
    window = [0, 1, 6, 7]  # the top-left window's cells, raster order
    x[window] = x[0] + 0.01 * torch.randn(4, 8, generator=g)
    folded = alike_windows(x, (1, 4, 6), 0.9)
    assert folded.nonzero()[:, 0].tolist() == [0, 1, 6]  # the window's last token stands for it
    unit = F.normalize(x, dim=-1)
    for w in ([2, 3, 8, 9], [14, 15, 20, 21]):  # others stay unless their mean pairwise cosine clears the bar
        mean = (unit[w] @ unit[w].T).sum().sub(4).div(12)
        assert bool(folded[w[:3]].any()) == bool(mean >= 0.9)
    assert not alike_windows(x, None, 0.9).any()


def test_mustdrop_keeps_the_union_of_both_filters_top_lists():
    attention = torch.tensor([[0.5, 0.0, 0.1, 0.2, 0.0], [0.0, 0.1, 0.1, 0.2, 0.3], [0.0, 0.1, 0.1, 0.25, 0.0]])
    # global (column sums): 0.5, 0.2, 0.3, 0.65, 0.3 -> 3, 0, 2, 4, 1; individual (column maxima): 0 (0.5), 4 (0.3), 3
    assert dual_attention_order(attention).tolist()[:4] == [3, 0, 4, 2]
    embeds, context = torch.randn(5, 4, generator=torch.Generator().manual_seed(3)), torch.zeros(3, 4)
    view = VisionTokens(Span("image", torch.arange(5), (1, 1, 5)), embeds, context=context, text_attention=attention)
    assert tokred.MustDrop().select(view, 2, torch.Generator()).tolist() == [0, 3]
