"""DyCoke (Tao et al., CVPR 2025) in two stages. Temporal token merging (TTM) prunes the tokens of a video that
repeat the same-position token of an earlier frame in their window of four, so the budget goes to what changes
over time. With `decode_keep` below 1, dynamic KV pruning then has the LLM layers after `decode_layer` read, at
each decode step, only the vision tokens that step's own query attends to most (`stages/decode_prune.py`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import TokenReducer, _count, check_layer, register
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

    Dynamic KV pruning (`decode_keep` < 1; the default 1 leaves it off): at every one-token decode step, layer
    `decode_layer` measures the new token's attention over the whole cache (softmax, averaged over heads) and
    each video or image keeps the `decode_keep` share of its tokens that attention ranks highest (rounded half up,
    at least one; `decode_select`); in that step every later layer reads only those, with all text and generated
    tokens. The cache keeps every token, so one pruned at a step is back at any later step whose query attends to
    it again. ``decode_layer=2`` is the official ``dycoke_l=3`` (whose layer 3 reads what layer 2's attention
    chose) and `decode_keep` its ``1 - dycoke_p``. The prefill, and with it the first generated token, is not
    pruned, nor is a call without a cache (``use_cache=False``): it has no decode steps, so its tokens are plain
    DyCoke's, not those of a cached generate.

    What the dynamic pruning saves: attention reads, never memory. The later layers gather the kept keys and
    values and run the model's own kernel (sdpa, flash, eager) on them alone, so attention reads the kept rows
    instead of all, after copying them: a net saving only where the kept rows are under about a third of the
    cache, and a small one next to transformers' DynamicCache, which copies every layer's whole cache at each
    step. The cache holds every token throughout.

    Deliberate differences from the official code: one budget k per span ranked across all its frames (the
    official keeps int(ratio * tokens per frame) in every non-pivot frame and pivot frames whole); every
    window follows the same rule, including the last (the official loop skips the pivot comparison of the last
    window when t is a multiple of four, keeping its third frame whole) and a trailing partial one (the
    official drops an unpaired last frame). While decoding: every step selects afresh, the paper's rule (the
    official code selects only when the cosine similarity of the step's vision attention to the previous step's
    falls below 0.9, and at the other steps reads the whole cache, since it resets its kept list at every step's
    first layer); each sample and each of its videos and images is ranked on its own (the official reads sample
    0's attention over one video at a fixed offset, floors the count, and leaves LLaVA-OneVision's trailing
    newline token out of the ranking, where here it is one of the video's tokens)."""

    decode_keep: float = 1.0
    decode_layer: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.decode_keep
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 < value <= 1:
            raise ValueError(f"DyCoke.decode_keep must be a number in (0, 1] (1: no decode pruning), got {value!r}")
        check_layer(self, "decode_layer", self.decode_layer)

    @property
    def idle(self) -> bool:
        return super().idle and not self.prunes_decode

    def as_idle(self) -> DyCoke:
        return dataclasses.replace(super().as_idle(), decode_keep=1.0)

    @property
    def prunes_decode(self) -> bool:
        """Whether decode steps prune the cache the layers after `decode_layer` read (the pre_llm stage asks)."""
        return self.decode_keep < 1

    def decode_select(self, scores: torch.Tensor) -> torch.Tensor:
        """(k,) ascending indices of the span's tokens a decode step keeps, given (n,) the attention its query pays
        them at `decode_layer`: the k = `decode_keep` * n (rounded half up, at least one) it attends to most, ties
        to the earlier token."""
        k = _count(self.decode_keep, len(scores))
        return scores.argsort(descending=True, stable=True)[:k].sort().values

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        redundancy = temporal_redundancy(tokens.embeds, tokens.span.grid)
        pivots = torch.isinf(redundancy).nonzero().flatten()
        if k <= len(pivots):
            return pivots[uniform_stride(len(pivots), k, redundancy.device)]
        return redundancy.argsort(stable=True)[:k].sort().values
