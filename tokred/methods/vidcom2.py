"""VidCom2 (Liu et al., 2025, "Video Compression Commander"): frames that differ most from the rest of the video
get more of the budget (frame compression adjustment), and within each frame the tokens least like the video's
and the frame's mean are kept (adaptive token compression), so distinct moments and distinct details survive."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import TokenReducer, register
from tokred.methods.fastvid import frames_of
from tokred.tokens import VisionTokens

BANDWIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)
"""The official code's Gaussian kernel widths (alpha in exp(-d^2 / (2 alpha)), summed over all five)."""


def low_variance_channels(features: torch.Tensor, share: float) -> torch.Tensor:
    """(n, c) the `share` of the (n, d) features' channels that vary least over the n tokens (at least one), as
    the official code measures similarity on them; ties go to the lower channel index."""
    d = features.shape[-1]
    c = min(d, max(1, int(d * share)))
    variance = features.var(dim=0, unbiased=False)
    order = variance.argsort(stable=True)[:c].sort().values
    return features[:, order]


def kernel_similarity(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """(...,) multi-scale Gaussian similarity of each row of x to `center` (broadcast), over `BANDWIDTHS`."""
    distance = (x - center).pow(2).sum(-1)
    return sum(torch.exp(-distance / (2 * a)) for a in BANDWIDTHS)


def uniqueness_scores(frames: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For (t, m, d) frames of tokens: (t,) each frame's similarity to the video (its tokens' mean kernel
    similarity to the video's mean token; lower is more unique) and (t, m) each token's similarity to the
    video's mean plus to its frame's mean (lower is more distinct). Tokens are L2-normalized on the
    low-variance channels first."""
    t, m, d = frames.shape
    x = low_variance_channels(frames.float().reshape(t * m, d), share)
    x = F.normalize(x, dim=-1).view(t, m, -1)
    to_video = kernel_similarity(x, x.mean((0, 1), keepdim=True))
    to_frame = kernel_similarity(x, x.mean(1, keepdim=True))
    return to_video.mean(1), to_video + to_frame


def frame_shares(uniqueness: torch.Tensor, temperature: float) -> torch.Tensor:
    """(t,) each frame's share of the budget, summing to 1: the official scale 1 + p_i - mean(p), p the softmax
    of the frames' uniqueness over `temperature`, divided by the frame count."""
    t = len(uniqueness)
    p = torch.softmax((uniqueness - uniqueness.max()) / temperature, dim=0)
    return (1 + p - 1 / t) / t


def frame_budgets(shares: torch.Tensor, k: int, per: int) -> torch.Tensor:
    """(t,) integer budgets summing to exactly k (k <= t * per), each at most `per` and, when k >= t, at least
    one. Shares above the cap are capped and the rest re-spread in proportion (water-filling), then rounded by
    largest remainder; ties go to the earlier frame. With k < t the k largest shares get one token each."""
    t = len(shares)
    shares = shares.double()
    if k < t:
        budgets = torch.zeros(t, dtype=torch.long, device=shares.device)
        budgets[shares.argsort(descending=True, stable=True)[:k]] = 1
        return budgets
    ideal = shares * k
    capped = torch.zeros(t, dtype=torch.bool, device=shares.device)
    while True:
        over = ~capped & (ideal > per)
        if not over.any():
            break
        capped |= over
        ideal[capped] = float(per)
        free = ~capped
        ideal[free] = shares[free] / shares[free].sum() * (k - per * int(capped.sum()))
    budgets = ideal.floor().long().clamp(max=per)
    remainder = (ideal - budgets).masked_fill(budgets >= per, -math.inf)
    short = k - int(budgets.sum())
    budgets[remainder.argsort(descending=True, stable=True)[:short]] += 1
    for frame in (budgets == 0).nonzero().flatten().tolist():  # floors of ideals below one
        surplus = budgets.double() - ideal
        surplus[budgets <= 1] = -math.inf
        budgets[int(surplus.argmax())] -= 1
        budgets[frame] = 1
    return budgets


@register("vidcom2", stage="pre_llm")
@dataclass(frozen=True)
class VidCom2(TokenReducer):
    """Split the span's budget k among the grid's temporal slots by frame uniqueness (a frame whose tokens are
    less like the video's mean token gets more, by the official 1 + softmax(u / `temperature`) - mean scale),
    then keep in each frame the tokens with the lowest summed Gaussian-kernel similarity to the video's and
    the frame's mean token, on the `channels` share of least-varying channels of the projected features (the
    LLM's input embeddings). Images (no grid, t == 1, or a grid not matching the span) are one frame: only the
    within-frame selection, with budget k. Deliberate differences from the official code: the budget is
    exactly k per span (the official per-frame round() and clamp to [1, all] can keep more or fewer): the
    shares are capped at a frame's tokens with the excess re-spread in proportion, rounded by largest
    remainder, with at least one token a frame when k >= frames (below that, the k most unique frames keep
    one each); a frame is a temporal slot of the grid (for Qwen2.5-VL, two input frames); ties break by index."""

    temperature: float = 0.01
    channels: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        for field in ("temperature", "channels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isnan(value):
                raise ValueError(f"VidCom2.{field} must be a number > 0, got {value!r}")
        if self.channels > 1:
            raise ValueError(f"VidCom2.channels must be a share in (0, 1], got {self.channels!r}")

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        x = tokens.embeds
        n = len(x)
        t, per = frames_of(tokens.span.grid, n)
        frame_similarity, token_similarity = uniqueness_scores(x.reshape(t, per, -1), self.channels)
        budgets = [k] if t == 1 else frame_budgets(frame_shares(-frame_similarity, self.temperature), k, per).tolist()
        kept = []
        for frame, budget in enumerate(budgets):
            if budget:
                order = token_similarity[frame].argsort(stable=True)[:budget]
                kept.append(order + frame * per)
        return torch.cat(kept).sort().values
