"""VidCom2's rules on plain tensors: unique frames get more of the budget, the budget is exact and spares every
frame, and the selection matches a by-hand reading of the paper's (and official code's) definition."""

from __future__ import annotations

import math

import pytest
import torch

import tokred  # noqa: F401  (registers the methods)
from tokred.methods.vidcom2 import VidCom2, frame_budgets, frame_shares
from tokred.tokens import Span, VisionTokens


def video(embeds: torch.Tensor, grid: tuple[int, int, int]) -> VisionTokens:
    return VisionTokens(Span("video", torch.arange(len(embeds)), grid=grid), embeds)


def per_frame(kept: torch.Tensor, t: int, per: int) -> list[int]:
    return torch.bincount(kept // per, minlength=t).tolist()


def one_odd_frame(t: int, h: int, w: int, odd: int, seed: int = 0) -> torch.Tensor:
    """t frames of h * w tokens around one frame vector, except frame `odd`, around its opposite."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    centers = torch.ones(t, 1, d)
    centers[odd] = -1
    return (centers + 0.3 * torch.randn(t, h * w, d, generator=g)).reshape(t * h * w, d)


# -- the by-hand reference -------------------------------------------------------------------------------------
def gaussian(a: list[float], b: list[float]) -> float:
    d2 = sum((x - y) ** 2 for x, y in zip(a, b, strict=True))
    return sum(math.exp(-d2 / (2 * s)) for s in (1 / 8, 1 / 4, 1 / 2, 1, 2))


def mean_of(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(rows) for col in zip(*rows, strict=True)]


def reference(x: torch.Tensor, t: int, per: int, k: int) -> tuple[list[int], list[int]]:
    """(budgets, kept) by the definition: half the channels, the least varying; unit tokens; a frame's
    uniqueness is minus its tokens' mean similarity to the video mean; scale 1 + softmax(u / 0.01) - 1 / t; in
    each frame the tokens least similar to the video mean plus the frame mean. Budgets by largest remainder."""
    rows = x.double().tolist()
    d = len(rows[0])
    means = mean_of(rows)
    variance = [sum((r[c] - means[c]) ** 2 for r in rows) / len(rows) for c in range(d)]
    channels = sorted(range(d), key=lambda c: (variance[c], c))[: d // 2]
    units = []
    for r in rows:
        v = [r[c] for c in channels]
        norm = math.sqrt(sum(e * e for e in v))
        units.append([e / norm for e in v])
    frames = [units[f * per : (f + 1) * per] for f in range(t)]
    video_mean = mean_of(units)
    uniqueness = [-sum(gaussian(u, video_mean) for u in fr) / per for fr in frames]
    top = max(uniqueness)
    e = [math.exp((u - top) / 0.01) for u in uniqueness]
    p = [v / sum(e) for v in e]
    ideal = [k * (1 + pi - 1 / t) / t for pi in p]
    assert all(1 <= i <= per for i in ideal), "the reference covers the uncapped case only"
    budgets = [math.floor(i) for i in ideal]
    by_remainder = sorted(range(t), key=lambda f: (-(ideal[f] - budgets[f]), f))
    for f in by_remainder[: k - sum(budgets)]:
        budgets[f] += 1
    kept = []
    for f, fr in enumerate(frames):
        frame_mean = mean_of(fr)
        score = [gaussian(u, video_mean) + gaussian(u, frame_mean) for u in fr]
        kept += [f * per + j for j in sorted(range(per), key=lambda j: (score[j], j))[: budgets[f]]]
    return budgets, sorted(kept)


# -- tests -------------------------------------------------------------------------------------------------------
def test_vidcom2_is_registered_for_pre_llm():
    assert tokred.methods.METHODS["vidcom2"] is VidCom2 and VidCom2.stage == "pre_llm"


def test_the_odd_frame_gets_more_than_each_repeated_frame():
    t, h, w, k = 6, 4, 4, 24
    x = one_odd_frame(t, h, w, odd=3)
    kept = VidCom2().select(video(x, (t, h, w)), k, torch.Generator())
    counts = per_frame(kept, t, h * w)
    assert sum(counts) == k == len(kept)
    assert all(counts[3] > c for f, c in enumerate(counts) if f != 3), counts
    assert min(counts) >= 1


def test_equal_frames_share_the_budget_evenly():
    t, h, w = 4, 3, 3
    frame = torch.randn(h * w, 8, generator=torch.Generator().manual_seed(7))
    kept = VidCom2().select(video(frame.repeat(t, 1), (t, h, w)), 12, torch.Generator())
    assert per_frame(kept, t, h * w) == [3, 3, 3, 3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selection_matches_the_by_hand_definition(seed: int):
    t, h, w, k = 6, 4, 5, 36
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, 1, 12, generator=g) + 0.8 * torch.randn(t, h * w, 12, generator=g)).reshape(-1, 12)
    budgets, expected = reference(x, t, h * w, k)
    kept = VidCom2().select(video(x, (t, h, w)), k, torch.Generator())
    assert per_frame(kept, t, h * w) == budgets
    assert kept.tolist() == expected
    assert kept.dtype == torch.long


@pytest.mark.parametrize("k", [8, 9, 12])
def test_no_frame_loses_all_its_tokens(k: int):
    t, h, w = 8, 4, 4
    x = one_odd_frame(t, h, w, odd=5, seed=3)  # the odd frame's share rounds up; the rest round near zero
    kept = VidCom2().select(video(x, (t, h, w)), k, torch.Generator())
    counts = per_frame(kept, t, h * w)
    assert min(counts) >= 1 and sum(counts) == k
    assert counts[5] == max(counts)


def test_budgets_are_exact_capped_and_spare_every_frame():
    g = torch.Generator().manual_seed(11)
    t, per = 7, 5
    for _ in range(20):
        shares = frame_shares(torch.randn(t, generator=g) * 0.03, 0.01)
        assert torch.isclose(shares.sum(), torch.tensor(1.0))
        for k in range(t, t * per + 1):
            b = frame_budgets(shares, k, per)
            assert int(b.sum()) == k and int(b.min()) >= 1 and int(b.max()) <= per, (k, b.tolist())
    b = frame_budgets(torch.tensor([0.1, 0.5, 0.2, 0.2]), 2, 10)  # k below the frame count
    assert b.tolist() == [0, 1, 1, 0]


def test_a_frame_with_most_of_the_share_is_capped_and_the_rest_respread():
    b = frame_budgets(torch.tensor([0.7, 0.1, 0.1, 0.1]), 20, 8)
    assert b.tolist() == [8, 4, 4, 4]


def test_image_spans_keep_the_tokens_least_like_their_mean():
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(5))
    _, expected = reference(x, 1, 30, 7)
    for span in (Span("image", torch.arange(30)), Span("video", torch.arange(30), grid=(1, 5, 6))):
        kept = VidCom2().select(VisionTokens(span, x), 7, torch.Generator())
        assert kept.tolist() == expected


def test_a_grid_that_does_not_match_the_span_is_one_frame():
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(6))
    kept = VidCom2().select(video(x, (2, 4, 4)), 7, torch.Generator())  # 32 != 30 tokens
    assert kept.tolist() == reference(x, 1, 30, 7)[1]


def test_select_is_deterministic_and_keeps_its_device():
    x = one_odd_frame(4, 3, 3, odd=0)
    a = VidCom2().select(video(x, (4, 3, 3)), 10, torch.Generator())
    b = VidCom2().select(video(x.clone(), (4, 3, 3)), 10, torch.Generator())
    assert torch.equal(a, b) and a.device == x.device
    assert torch.equal(a, a.unique()) and len(a) == 10


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"temperature": -1.0}, {"channels": 0}, {"channels": 1.5}])
def test_bad_settings_are_refused(bad: dict):
    with pytest.raises(ValueError):
        VidCom2(**bad)
