"""DyCoke (Tao et al., CVPR 2025): temporal token merging (TTM) prunes the tokens of a video that repeat the
same-position token of an earlier frame in their window of four, so the budget goes to what changes over time.
Its second stage, dynamic KV-cache pruning while decoding, is not built here: it belongs to the kv stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import TokenReducer, register
from tokred.tokens import VisionTokens

WINDOW = 4
"""Frames per TTM window, as in the paper and the official code."""


def reference_frames(t: int) -> list[int | None]:
    """The frame each of t frames is compared to, None for a window's first frame (its pivot). In a window of
    four frames (a, b, c, d): b and c are compared to the pivot a, d to c; a trailing shorter window keeps
    the same rule for the frames it has."""
    refs: list[int | None] = []
    for f in range(t):
        offset = f % WINDOW
        refs.append(None if offset == 0 else f - 1 if offset % 2 else f - offset)
    return refs


def temporal_redundancy(features: torch.Tensor, grid: tuple[int, int, int] | None) -> torch.Tensor:
    """(n,) each token's cosine similarity to the same-position token of its reference frame (see
    `reference_frames`), in the float32 of `features`'s device; -inf for pivot-frame tokens, which are never
    redundant. A span with no usable temporal grid (none, t == 1, or t * h * w != n) is one frame: all pivot."""
    n = len(features)
    if grid is None or grid[0] <= 1 or grid[0] * grid[1] * grid[2] != n:
        return torch.full((n,), -float("inf"), device=features.device)
    t = grid[0]
    unit = F.normalize(features.float(), dim=-1).view(t, n // t, -1)
    refs = reference_frames(t)
    later = [f for f, r in enumerate(refs) if r is not None]
    earlier = [r for r in refs if r is not None]
    redundancy = torch.full((t, n // t), -float("inf"), device=features.device)
    redundancy[later] = (unit[later] * unit[earlier]).sum(-1)
    return redundancy.view(n)


def uniform_stride(m: int, k: int, device: torch.device) -> torch.Tensor:
    """(k,) ascending, distinct indices into m items (k <= m), spread evenly: floor((i + 1/2) * m / k)."""
    return ((torch.arange(k, device=device, dtype=torch.float64) + 0.5) * m / k).floor().long()


@register("dycoke", stage="pre_llm")
@dataclass(frozen=True)
class DyCoke(TokenReducer):
    """Keep the k tokens least redundant over time: every pivot-frame token (a window's first frame), then the
    other tokens by ascending cosine similarity (of the projected features the LLM receives, as the official
    code uses) to the same-position token of the frame they are compared with (ties by raster order). Frames
    are the grid's temporal slots (for Qwen2.5-VL, each is two input frames). With ``merge=True`` the pruned
    tokens are folded into their most similar kept token (the base class's merge).

    Images (no grid, or t == 1) have nothing to compare: every token is a pivot, and so are all candidates when
    k is below the pivot count; then the kept ones are spread evenly over them in raster order (uniform stride).

    Deliberate differences from the official code: one budget k per span ranked across all its frames (the
    official keeps int(ratio * tokens per frame) in every non-pivot frame and pivot frames whole); every
    window follows the same rule, including the last (the official loop skips the pivot comparison of the last
    window when t is a multiple of four, keeping its third frame whole) and a trailing partial one (the
    official drops an unpaired last frame); the decoding-time KV pruning is not implemented (kv stage)."""

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        redundancy = temporal_redundancy(tokens.embeds, tokens.span.grid)
        pivots = torch.isinf(redundancy).nonzero().flatten()
        if k <= len(pivots):
            return pivots[uniform_stride(len(pivots), k, redundancy.device)]
        return redundancy.argsort(stable=True)[:k].sort().values
