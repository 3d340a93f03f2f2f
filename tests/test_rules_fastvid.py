"""FastVID's rules on plain tensors: dynamic temporal segmentation, proportional segment budgets, DPC-kNN density
peaks against a by-hand reference, and the merge it returns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokred.methods.fastvid import FastVID, apportion, density_peak_scores, dynamic_segments
from tokred.tokens import Span, VisionTokens


def video(embeds: torch.Tensor, grid: tuple[int, int, int] | None, scores: torch.Tensor | None = None) -> VisionTokens:
    kind = "video" if grid is not None and grid[0] > 1 else "image"
    if scores is None:
        scores = torch.zeros(len(embeds))
    return VisionTokens(Span(kind, torch.arange(len(embeds)), grid), embeds, encoder_scores=scores)


def scenes(cut: int, t: int = 8, per: int = 16, d: int = 8, seed: int = 0) -> torch.Tensor:
    """(t * per, d): frames before `cut` show one scene, the rest another (each token its scene's pattern
    token plus a little noise, so frames of a scene are alike and the scenes are far apart)."""
    g = torch.Generator().manual_seed(seed)
    first, second = torch.randn(per, d, generator=g), torch.randn(per, d, generator=g)
    first[:, : d // 2] += 4.0
    second[:, d // 2 :] += 4.0
    frames = [(first if f < cut else second) + 0.05 * torch.randn(per, d, generator=g) for f in range(t)]
    return torch.cat(frames)


def reference_scores(x: torch.Tensor, neighbours: int = 4) -> list[float]:
    """DPC-kNN written from its definition, one token at a time."""
    m, d = x.shape
    dist = [[math.dist(x[i].tolist(), x[j].tolist()) / math.sqrt(d) for j in range(m)] for i in range(m)]
    rho = [math.exp(-sum(v**2 for v in sorted(row)[:neighbours]) / neighbours) for row in dist]
    largest = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(m) if rho[j] > rho[i]], default=largest) for i in range(m)]
    return [r * s for r, s in zip(rho, delta, strict=True)]


# -- (1) dynamic temporal segmentation ------------------------------------------------------------------------
@pytest.mark.parametrize("cut", [4, 3])
def test_two_scenes_are_cut_between_them(cut: int):
    x = scenes(cut)
    means = x.view(8, 16, -1).mean(1)
    assert dynamic_segments(means, segments=1, tau=0.84, most=100) == [cut, 8 - cut]
    # with no transition below tau, the c - 1 least similar cuts are still taken: the scene change first
    assert dynamic_segments(means, segments=2, tau=-1.0, most=100) == [cut, 8 - cut]
    assert len(dynamic_segments(means, segments=4, tau=-1.0, most=100)) == 4
    # never more segments than the budget allows
    assert dynamic_segments(means, segments=8, tau=0.84, most=2) == [cut, 8 - cut]


@pytest.mark.parametrize(("cut", "k", "shares"), [(4, 32, (16, 16)), (3, 20, (8, 12)), (4, 9, (5, 4))])
def test_each_segment_keeps_its_proportional_budget(cut: int, k: int, shares: tuple[int, int]):
    x = scenes(cut)
    merge = FastVID(segments=1).fold(video(x, (8, 4, 4)), k, torch.Generator())
    boundary = cut * 16
    assert (int((merge.index < boundary).sum()), int((merge.index >= boundary).sum())) == shares
    # no token is merged across the scene cut
    into = merge.index[merge.groups]
    assert bool(((torch.arange(128) < boundary) == (into < boundary)).all())


def test_apportion_rounds_by_largest_remainder_and_gives_every_part_one():
    assert apportion(20, [48, 80]) == [8, 12]  # 7.5 / 12.5: the tie goes to the earlier part
    assert apportion(10, [30, 30, 40]) == [3, 3, 4]
    assert apportion(7, [20, 30, 50]) == [1, 2, 4]  # 1.4 / 2.1 / 3.5: the largest remainder gets the spare
    assert apportion(10, [10, 25, 65]) == [1, 3, 6]
    assert apportion(2, [16, 112]) == [1, 1]  # 0.25 / 1.75 would leave the first empty
    assert sum(apportion(37, [16, 48, 64])) == 37


# -- (2) density peaks ----------------------------------------------------------------------------------------
def test_density_scores_match_a_by_hand_dpc_knn():
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(density_peak_scores(x), torch.tensor(reference_scores(x)), rtol=1e-4, atol=1e-6)


def test_density_peaks_selected_are_the_by_hand_top_scores():
    x = torch.randn(36, 6, generator=torch.Generator().manual_seed(8))
    reference = torch.tensor(reference_scores(x))
    # contextual=1: the whole budget is density peaks (an image is one frame, its own anchor frame)
    merge = FastVID(contextual=1.0).fold(video(x, (1, 6, 6)), 7, torch.Generator())
    assert merge.index.tolist() == sorted(reference.topk(7).indices.tolist())


def test_density_peaks_cover_each_cluster_once():
    g = torch.Generator().manual_seed(9)
    centres = torch.tensor([[6.0, 0, 0, 0], [0, 6.0, 0, 0], [0, 0, 6.0, 0]])
    sizes = [14, 6, 4]
    x = torch.cat([c + 0.3 * torch.randn(s, 4, generator=g) for c, s in zip(centres, sizes, strict=True)])
    merge = FastVID(contextual=1.0).fold(video(x, None), 3, torch.Generator())
    cluster = torch.tensor([0] * 14 + [1] * 6 + [2] * 4)
    assert sorted(cluster[merge.index].tolist()) == [0, 1, 2]
    assert torch.equal(merge.groups, cluster)  # every token merges into its own cluster's peak


# -- (3) exact count and the merge ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5, 17, 40, 127, 128])
def test_exact_count_and_a_well_formed_merge(k: int):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(128, 8, generator=g)
    scores = torch.rand(128, generator=g)
    merge = FastVID().fold(video(x, (8, 4, 4), scores), k, torch.Generator())
    merge.check(128, k, 8)
    assert torch.equal(torch.bincount(merge.groups, minlength=k) >= 1, torch.ones(k, dtype=torch.bool))


def test_merged_rows_are_the_weighted_mean_of_their_group():
    g = torch.Generator().manual_seed(3)
    x = scenes(4, seed=3) + 0.5 * torch.randn(128, 8, generator=g)
    scores = torch.rand(128, generator=g)
    method = FastVID(segments=1, beta=0.6)
    merge = method.fold(video(x, (8, 4, 4), scores), 30, torch.Generator())
    merged_any = False
    for slot, own in enumerate(merge.index.tolist()):
        members = [i for i in (merge.groups == slot).nonzero().flatten().tolist() if i != own]
        if not members:
            assert torch.equal(merge.rows[slot], x[own])
            continue
        merged_any = True
        w = max(1 / (len(members) + 1), method.beta)
        assert torch.allclose(merge.rows[slot], w * x[own] + (1 - w) * x[members].mean(0), atol=1e-5)
    assert merged_any


def test_salient_tokens_stay_alone_and_the_rest_merge_into_the_nearest_peak():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=g)
    scores = torch.rand(64, generator=g)
    scores[[5, 20, 40, 60]] = 10.0  # one most-attended token in each of the 4 frames
    merge = FastVID(segments=1, tau=-1.0).fold(video(x, (4, 4, 4), scores), 10, torch.Generator())
    # one segment of 4 frames, 10 tokens: 4 density peaks (floor 0.4 * 10) and 6 salient, split 2, 2, 1, 1
    salient = {
        int(f * 16 + scores[f * 16 : (f + 1) * 16].topk(c).indices[j])
        for f, c in enumerate([2, 2, 1, 1])
        for j in range(c)
    }
    assert {5, 20, 40, 60} <= salient <= set(merge.index.tolist())
    peaks = sorted(set(merge.index.tolist()) - salient)
    assert len(peaks) == 4
    targets = merge.index[merge.groups]
    unit = F.normalize(x, dim=-1)
    for i in range(64):
        if i in salient or i in peaks:
            assert int(targets[i]) == i
        else:
            assert int(targets[i]) == max(peaks, key=lambda p: float(unit[i] @ unit[p]))


# -- (4) image spans ------------------------------------------------------------------------------------------
def test_image_spans_are_one_segment():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(49, 8, generator=g)
    scores = torch.rand(49, generator=g)
    without = FastVID().fold(video(x, None, scores), 12, torch.Generator())
    single = FastVID().fold(video(x, (1, 7, 7), scores), 12, torch.Generator())
    without.check(49, 12, 8)
    assert torch.equal(without.index, single.index) and torch.equal(without.groups, single.groups)
    # 12 tokens: 4 density peaks over the whole image, 8 most-attended tokens
    assert set(scores.topk(8).indices.tolist()) <= set(without.index.tolist())


def test_needs_the_tower_attention():
    x = torch.randn(16, 4)
    with pytest.raises(RuntimeError, match="tower"):
        FastVID().fold(VisionTokens(Span("image", torch.arange(16)), x), 4, torch.Generator())
