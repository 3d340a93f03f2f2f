"""DyCoke's temporal token merging on plain tensors: pivots and changing tokens survive, and the selection agrees
with a reference written from the paper's definition."""

from __future__ import annotations

import math

import pytest
import torch

from tokred.methods.dycoke import DyCoke
from tokred.tokens import Span, VisionTokens


def video(embeds: torch.Tensor, grid: tuple[int, int, int] | None) -> VisionTokens:
    kind = "video" if grid is not None and grid[0] > 1 else "image"
    return VisionTokens(Span(kind, torch.arange(len(embeds)), grid), embeds)


def select(embeds: torch.Tensor, grid: tuple[int, int, int] | None, k: int, **fields) -> torch.Tensor:
    return DyCoke(**fields).select(video(embeds, grid), k, torch.Generator())


def reference(x: torch.Tensor, t: int, k: int) -> list[int]:
    """The paper's rule by hand: in each window of four frames, frames 2 and 3 are compared to frame 1 (the
    pivot), frame 4 to frame 3, token by token at the same position; pivots are kept, then the least similar."""
    per = len(x) // t
    ranked = []
    for f in range(t):
        o = f % 4
        for p in range(per):
            i = f * per + p
            if o == 0:
                ranked.append((-2.0, i))
                continue
            ref = f - 1 if o in (1, 3) else f - 2
            a, b = x[i].tolist(), x[ref * per + p].tolist()
            dot = sum(u * v for u, v in zip(a, b, strict=True))
            cosine = dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)))
            ranked.append((cosine, i))
    return sorted(i for _, i in sorted(ranked)[:k])


def test_dycoke_keeps_the_pivots_and_the_moving_token_before_any_repeat():
    t, h, w, d = 6, 3, 4, 16  # a full window and a partial one (frames 4, 5; pivot 4)
    per = h * w
    g = torch.Generator().manual_seed(0)
    background = torch.randn(per, d, generator=g)
    mover = torch.randn(d, generator=g) * 5
    frames = background.repeat(t, 1, 1)
    where = [(2 * f + 1) % per for f in range(t)]  # the moving token's position in each frame
    for f, p in enumerate(where):
        frames[f, p] = mover
    x = frames.reshape(t * per, d)
    changed = set()  # positions that differ from the frame they are compared with
    for f, ref in enumerate([None, 0, 0, 2, None, 4]):
        if ref is None:
            changed |= {f * per + p for p in range(per)}
        else:
            changed |= {f * per + where[f], f * per + where[ref]}
    kept = select(x, (t, h, w), len(changed))
    assert set(kept.tolist()) == changed
    assert {f * per + p for f, p in enumerate(where)} <= set(kept.tolist())
    assert set(range(per)) <= set(kept.tolist())  # the whole first frame
    # one token fewer: a changed token goes, never a pivot
    fewer = set(select(x, (t, h, w), len(changed) - 1).tolist())
    assert fewer < changed and {*range(per), *range(4 * per, 5 * per)} <= fewer


@pytest.mark.parametrize(("t", "k"), [(8, 60), (8, 100), (7, 50), (4, 30)])
def test_dycoke_matches_the_definition_by_hand(t, k):
    h, w = 3, 5
    x = torch.randn(t * h * w, 12, generator=torch.Generator().manual_seed(t * 100 + k))
    assert select(x, (t, h, w), k).tolist() == reference(x, t, k)


@pytest.mark.parametrize("k", [1, 7, 16, 17, 33, 64])
def test_dycoke_returns_exactly_k_ascending_long_indices(k):
    x = torch.randn(4 * 16, 8, generator=torch.Generator().manual_seed(k))
    kept = select(x, (4, 4, 4), k)
    assert kept.dtype == torch.long and kept.shape == (k,)
    assert bool((kept.diff() > 0).all()) and int(kept.min()) >= 0 and int(kept.max()) < 64


def test_dycoke_below_the_pivot_count_spreads_over_every_pivot_frame():
    t, per = 8, 16
    x = torch.randn(t * per, 8, generator=torch.Generator().manual_seed(3))
    kept = select(x, (t, 4, 4), 8).tolist()
    pivots = [*range(0, per), *range(4 * per, 5 * per)]
    assert set(kept) <= set(pivots)
    assert [i // per for i in kept] == [0, 0, 0, 0, 4, 4, 4, 4]  # both windows get pivots, evenly


@pytest.mark.parametrize("grid", [None, (1, 5, 7)])
def test_dycoke_images_keep_an_even_stride(grid):
    x = torch.randn(35, 8, generator=torch.Generator().manual_seed(4))
    kept = select(x, grid, 10)
    assert kept.tolist() == [1, 5, 8, 12, 15, 19, 22, 26, 29, 33]  # floor((i + 1/2) * 35 / 10)
    assert select(x, grid, 35).tolist() == list(range(35))


def test_dycoke_grid_that_does_not_describe_the_tokens_is_one_frame():
    x = torch.randn(20, 8, generator=torch.Generator().manual_seed(5))
    assert select(x, (4, 2, 3), 4).tolist() == select(x, None, 4).tolist() == [2, 7, 12, 17]


def test_dycoke_merge_folds_the_pruned_tokens_into_the_kept():
    t, per = 4, 9
    x = torch.randn(t * per, 8, generator=torch.Generator().manual_seed(6))
    method = DyCoke(merge=True, keep=0.5)
    tokens = video(x, (t, 3, 3))
    merge = method.fold(tokens, 18, torch.Generator())
    merge.check(t * per, 18, 8)
    assert merge.index.tolist() == method.select(tokens, 18, torch.Generator()).tolist()
    sizes = torch.bincount(merge.groups, minlength=18)
    assert int(sizes.sum()) == t * per and int(sizes.max()) > 1
