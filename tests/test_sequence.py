"""The model-agnostic pieces on plain tensors: budgets, methods, selections, masks, the FastV signal."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokred.adapters.qwen3_vl import take_visual
from tokred.compat import attention_mask
from tokred.kernels import last_query_attention_reference as last_query_attention
from tokred.methods import FastV, Random, Span, VisionTokens
from tokred.stages.select import choose
from tokred.tokens import Selection


@given(n=st.integers(1, 5000), keep=st.floats(0.001, 1.0))
def test_budget_rounds_half_up_and_keeps_at_least_one(n, keep):
    k = Random(keep=keep).budget(n)
    assert 1 <= k <= n
    assert k == max(1, int(keep * n + 0.5))


def test_budget_examples():
    assert [Random(keep=0.25).budget(n) for n in (1, 2, 6, 10, 576)] == [1, 1, 2, 3, 144]
    assert Random(keep=0.5, keep_tokens=7).budget(100) == 7
    assert Random(keep_tokens=7).budget(5) == 5


def _tokens(n: int, scores=None) -> VisionTokens:
    return VisionTokens(Span("image", torch.arange(n)), torch.zeros(n, 4), scores)


def test_random_is_seeded_sorted_and_sized():
    pick = lambda seed: Random(seed=seed).select(_tokens(50), 10, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(pick(3), pick(3))
    assert not torch.equal(pick(3), pick(4))
    assert pick(3).tolist() == sorted(set(pick(3).tolist())) and len(pick(3)) == 10


def test_fastv_takes_the_top_scores_in_order():
    scores = torch.tensor([0.1, 0.9, 0.3, 0.8, 0.05, 0.7])
    assert FastV().select(_tokens(6, scores), 3, None).tolist() == [1, 3, 5]


def test_choose_respects_each_span():
    spans = [[Span("image", torch.tensor([1, 2, 3, 4])), Span("image", torch.tensor([6, 7]))], []]
    scores = torch.arange(16.0).view(2, 8)
    selection = choose(FastV(keep=0.5), spans, torch.zeros(2, 8, 4), None, scores=scores)
    # sample 1 keeps all 8 positions, so sample 0's 5 are padded with its 3 dropped ones as masked filler
    assert selection.index.tolist() == [list(range(8))] * 2 and selection.merged == ()
    assert selection.key_valid[0].tolist() == [True, False, False, True, True, True, False, True]
    assert selection.key_valid[1].all()
    assert choose(FastV(keep=1.0), spans, torch.zeros(2, 8, 4), None, scores=scores) is None


def test_selection_pads_short_samples_with_masked_filler_and_drops_padding():
    keep = torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    padding = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    sel = Selection.from_keep(keep, padding)
    # sample 0 keeps 3 real positions (2, 4, 5), sample 1 keeps 4: one filler slot for sample 0
    assert sel.index.tolist() == [[0, 2, 4, 5], [0, 1, 2, 5]]
    assert sel.key_valid.tolist() == [[False, True, True, True], [True, True, True, True]]
    assert sel.has_filler and sel.old_len == 6 and sel.new_len == 4

    x = torch.arange(12.0).view(2, 6, 1)
    assert sel.take_hidden(x)[..., 0].tolist() == [[0, 2, 4, 5], [6, 7, 8, 11]]
    assert sel.take_positions(torch.arange(6)[None]).tolist() == [[0, 2, 4, 5], [0, 1, 2, 5]]
    rope = torch.arange(6).view(1, 1, 6).expand(3, 2, 6)
    assert sel.take_positions(rope).shape == (3, 2, 4)

    assert sel.padding_mask(padding).tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
    decode = torch.cat([padding, torch.ones(2, 2, dtype=torch.long)], 1)
    assert sel.padding_mask(decode, added=2).tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert sel.padding_mask(None, added=1).tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]

    spans = [[Span("image", torch.tensor([1, 2, 3, 4]))], [Span("image", torch.tensor([3, 4]))]]
    assert [[s.positions.tolist() for s in sample] for sample in sel.remap(spans)] == [[[1, 2]], [[]]]


def test_take_visual_keeps_deepstack_rows_in_step():
    visual = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rows = torch.arange(4.0)[:, None]  # one row per visual token, batch-major
    sel = Selection.from_keep(torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool), None)
    new_mask, (new_rows,) = take_visual(sel, visual, [rows])
    assert new_mask.tolist() == [[False, True, False], [True, True, False]]
    assert new_rows[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_attention_mask_formats():
    valid = torch.tensor([[True, False, True, True]])
    sdpa = attention_mask(valid, 2, "sdpa", torch.float32)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 2, 4)
    assert sdpa[0, 0].tolist() == [[True, False, True, False], [True, False, True, True]]
    eager = attention_mask(valid, 2, "eager", torch.float32)
    assert torch.equal(eager == 0, sdpa)
    assert torch.equal(attention_mask(valid, 2, "flash_attention_2", torch.float32), valid)


@settings(deadline=None, max_examples=20)
@given(heads=st.sampled_from([(4, 4), (4, 2), (6, 1)]), n=st.integers(3, 12), seed=st.integers(0, 100))
def test_last_query_attention_matches_naive_softmax(heads, n, seed):
    h, kv = heads
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, h, n, 8, generator=g), torch.randn(2, kv, n, 8, generator=g)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, 0] = False
    last = torch.tensor([n - 1, n - 2])
    got = last_query_attention(q, k, last, valid, 8**-0.5)
    kk = k.repeat_interleave(h // kv, dim=1)
    for b in range(2):
        logits = torch.einsum("hd,hnd->hn", q[b, :, last[b]], kk[b]) * 8**-0.5
        allowed = valid[b] & (torch.arange(n) <= last[b])
        want = logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(0)
        torch.testing.assert_close(got[b], want)
