"""FastVID (Shen et al., 2025): cut a video into segments of alike frames (dynamic temporal segmentation), then in
each segment keep the tokens the tower attends to most and merge the rest into density peaks (density
spatiotemporal pruning), so the budget covers every scene and each scene's context."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import ByTowerAttention, TokenMerger, register
from tokred.tokens import Merge, VisionTokens


def frames_of(grid: tuple[int, int, int] | None, n: int) -> tuple[int, int]:
    """(frames, tokens per frame) of a span of n tokens: its grid's t and h * w, or one frame of n tokens for
    an image (no grid, t == 1) or a grid that does not describe the n tokens."""
    if grid is not None and grid[0] > 1 and grid[0] * grid[1] * grid[2] == n:
        return grid[0], grid[1] * grid[2]
    return 1, n


def dynamic_segments(frame_features: torch.Tensor, segments: int, tau: float, most: int) -> list[int]:
    """Frame counts of the segments of a (t, d) sequence of frame features (each frame's mean token). A cut
    goes after frame i when the cosine similarity of frames i and i + 1 is one of the `segments` - 1 lowest or
    is below `tau` (the union, as the official code takes it); with more than `most` segments only the
    `most` - 1 lowest-similarity cuts stay."""
    t = len(frame_features)
    if t == 1 or most <= 1:
        return [t]
    unit = F.normalize(frame_features.float(), dim=-1)
    similarity = (unit[:-1] * unit[1:]).sum(-1)  # (t - 1,)
    order = similarity.argsort(stable=True).tolist()  # lowest similarity first, ties by frame
    below = set((similarity < tau).nonzero().flatten().tolist())
    cuts = [i for rank, i in enumerate(order) if rank < segments - 1 or i in below][: most - 1]
    bounds = [-1, *sorted(cuts), t - 1]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]


def apportion(k: int, sizes: list[int]) -> list[int]:
    """k split over parts of `sizes` in proportion, by largest remainder (ties to the earlier part), then
    each empty part given one token from the largest share; needs len(sizes) <= k <= sum(sizes)."""
    total = sum(sizes)
    exact = [k * s / total for s in sizes]
    shares = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in by_remainder[: k - sum(shares)]:
        shares[i] += 1
    for i, share in enumerate(shares):
        if share == 0:
            donor = max(range(len(shares)), key=lambda j: (shares[j], -j))
            shares[donor] -= 1
            shares[i] = 1
    return shares


def density_peak_scores(features: torch.Tensor, neighbours: int = 4) -> torch.Tensor:
    """(m,) DPC-kNN score of each of m tokens: local density rho = exp(-mean squared distance to its
    `neighbours` nearest tokens, itself included), times delta = the distance to the nearest denser token (the
    largest pairwise distance for the densest). Distances are Euclidean over sqrt(d); equal densities rank
    by index (the lower is denser)."""
    x = features.float()
    m = len(x)
    distance = torch.cdist(x[None], x[None])[0] / math.sqrt(x.shape[-1])
    nearest = distance.topk(min(neighbours, m), dim=-1, largest=False).values
    density = (-(nearest**2).mean(-1)).exp()
    index = torch.arange(m, device=x.device)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (index[None, :] < index[:, None])
    )
    delta = torch.where(denser, distance, distance.max()).amin(-1)
    return delta * density


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest scores, ties to the lower index."""
    return scores.float().argsort(descending=True, stable=True)[:count]


def _even(total: int, parts: int) -> list[int]:
    """total split into `parts` near-equal counts, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@register("fastvid", stage="pre_llm")
@dataclass(frozen=True)
class FastVID(ByTowerAttention, TokenMerger):
    """Videos are cut into segments where adjacent frames' mean tokens fall apart (the `segments` - 1 least
    similar transitions and every one below `tau`); each segment gets a share of the span's budget k in
    proportion to its tokens. In a segment, `contextual` of its share (at least one) goes to density peaks
    (DPC-kNN over each frame's tokens, from anchor frames every `step` frames counted back from the last) and
    the rest to salient tokens, the most tower-attended in each frame, split evenly over its frames and kept
    as they are. Every other token of the segment merges into its most cosine-similar density peak, whose row
    becomes w * itself + (1 - w) * the mean of its merged tokens, w = max(1 / (merged + 1), `beta`). An image
    (no grid, or t == 1) is one segment of one frame.

    Deliberate differences from the official code (Qwen2.5-VL): salient tokens rank by tokred's tower attention
    (mean attention received in the last full-attention block) rather than the official mean-query attention
    within each frame; the second-level split of a segment into runs of near-duplicate frames (similarity
    >= 0.95, whose budget goes to each run's last frame) is not done; the budget is exactly k per span (the
    official per-frame int() rounding and per-frame caps can keep fewer): segment shares round by largest
    remainder with one token at least each (the segments are capped at k), anchor-frame quotas that exceed a
    frame's tokens spill to the best density scores elsewhere in the segment; density ties break by index
    instead of random noise, so the result is deterministic."""

    segments: int = 8
    tau: float = 0.84
    contextual: float = 0.4
    step: int = 4
    beta: float = 0.6
    neighbours: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("segments", "step", "neighbours"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FastVID.{field} must be an integer >= 1, got {value!r}")
        bounds = {"tau": (-1.0, 1.0), "contextual": (0.0, 1.0), "beta": (0.0, 1.0)}
        for field, (low, high) in bounds.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"FastVID.{field} must be a number in [{low}, {high}], got {value!r}")

    def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
        if tokens.encoder_scores is None:
            raise RuntimeError("FastVID needs the vision tower's attention; it must run in the pre_llm stage")
        x, attention = tokens.embeds, tokens.encoder_scores.float()
        n, device = len(x), x.device
        t, per = frames_of(tokens.span.grid, n)
        frames = x.float().view(t, per, -1)
        lengths = dynamic_segments(frames.mean(1), self.segments, self.tau, k)
        budgets = apportion(k, [length * per for length in lengths])
        salient, peaks, targets = [], [], torch.empty(n, dtype=torch.long, device=device)
        start = 0
        for length, budget in zip(lengths, budgets, strict=True):
            first, stop = start * per, (start + length) * per
            chosen = torch.zeros(stop - first, dtype=torch.bool, device=device)
            n_context = min(budget, max(1, math.floor(budget * self.contextual)))
            for f, count in enumerate(_even(budget - n_context, length)):
                chosen[f * per + _top(attention[first + f * per : first + (f + 1) * per], count)] = True
            scores = torch.full((stop - first,), -1.0, device=device)
            for f in range(length):
                rest = (~chosen[f * per : (f + 1) * per]).nonzero().flatten() + f * per
                if len(rest):
                    scores[rest] = density_peak_scores(x[first:stop][rest], self.neighbours)
            anchors = list(range(length - 1, -1, -self.step))
            context = torch.zeros_like(chosen)
            for f, quota in zip(anchors, _even(n_context, len(anchors)), strict=True):
                frame = scores[f * per : (f + 1) * per]
                context[f * per + _top(frame, min(quota, int((frame >= 0).sum())))] = True
            short = n_context - int(context.sum())
            if short:
                context[_top(scores.masked_fill(context | chosen, -2.0), short)] = True
            own = (chosen | context).nonzero().flatten()
            targets[first + own] = first + own
            peak = context.nonzero().flatten()
            members = (~(chosen | context)).nonzero().flatten()
            if len(members):
                unit = F.normalize(x[first:stop].float(), dim=-1)
                targets[first + members] = first + peak[(unit[members] @ unit[peak].T).argmax(-1)]
            salient.append(first + chosen.nonzero().flatten())
            peaks.append(first + peak)
            start += length
        index = torch.cat(salient + peaks).sort().values
        slot = torch.full((n,), -1, dtype=torch.long, device=device)
        slot[index] = torch.arange(k, device=device)
        groups = slot[targets]
        rows = x[index].float()
        merged = ~torch.isin(torch.arange(n, device=device), index)
        counts = torch.zeros(k, device=device).index_add_(0, groups[merged], torch.ones_like(groups[merged]).float())
        sums = torch.zeros_like(rows).index_add_(0, groups[merged], x[merged].float())
        weight = (1 / (counts + 1)).clamp_min(self.beta)[:, None]
        mixed = weight * rows + (1 - weight) * sums / counts.clamp_min(1)[:, None]
        rows = torch.where(counts[:, None] > 0, mixed, rows)
        return Merge(index, rows.to(x.dtype), groups)
