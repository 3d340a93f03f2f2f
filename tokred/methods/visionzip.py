"""VisionZip (Yang et al., CVPR 2025): the tokens the vision tower attends to most, plus a few contextual tokens
merged from the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import ByTowerAttention, TokenMerger, register
from tokred.tokens import Merge, VisionTokens


def zip_tokens(features: torch.Tensor, scores: torch.Tensor, dominant: int, contextual: int) -> Merge:
    """Keep the `dominant` tokens of highest `scores` as they are; of the rest, every step-th (step = rest //
    contextual, `contextual` >= 1) becomes a contextual token, each other remaining token joins the one it is
    most cosine-similar to, and a contextual token carries its own row plus the mean of the rows that joined
    it (VisionZip's sum, not a mean of the group)."""
    n = len(features)
    order = scores.float().argsort(descending=True, stable=True)
    top, rest = order[:dominant].sort().values, order[dominant:].sort().values
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    joining = rest[~torch.isin(rest, targets)]
    unit = F.normalize(features.float(), dim=-1)
    nearest = targets[(unit[joining] @ unit[targets].T).argmax(-1)]
    index = torch.cat([top, targets]).sort().values
    groups = torch.empty(n, dtype=torch.long, device=features.device)
    groups[joining] = torch.searchsorted(index, nearest)
    groups[index] = torch.arange(len(index), device=features.device)
    rows = features[index].clone()
    if contextual:
        joined = ~torch.isin(torch.arange(n, device=features.device), index)
        sums = torch.zeros(len(index), features.shape[-1], device=features.device).index_add_(
            0, groups[joined], features[joined].float()
        )
        counts = torch.zeros(len(index), device=features.device).index_add_(
            0, groups[joined], torch.ones(int(joined.sum()), device=features.device)
        )
        rows = rows + (sums / counts.clamp_min(1)[:, None]).to(features.dtype)
    return Merge(index, rows, groups)


@register("visionzip", stage="pre_llm")
@dataclass(frozen=True)
class VisionZip(ByTowerAttention, TokenMerger):
    """`dominant` is the share of the budget spent on the tokens the tower attends to most (VisionZip's 54 of
    64); the rest are contextual tokens. Scores: the [CLS] row at the layer LLaVA takes its features from, or
    the mean attention each token receives in the last (full-attention) block of towers without [CLS]
    (Qwen: per merged 2x2 group, in raster order), read from the block's own q/k. Deliberate differences from
    the official code: contextual groups are formed by the similarity of the projected tokens (it uses the
    tower layer's keys); LLaVA's [CLS] does not reach the LLM (its default feature strategy drops it); and at
    least one contextual token is kept (so every dropped token has a group; a budget of one is all contextual)."""

    dominant: float = 54 / 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.dominant, bool) or not isinstance(self.dominant, (int, float)) or not 0 < self.dominant <= 1:
            raise ValueError(f"VisionZip.dominant must be a share in (0, 1], got {self.dominant!r}")

    def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
        if tokens.encoder_scores is None:
            raise RuntimeError("VisionZip needs the vision tower's attention; it must run in the pre_llm stage")
        dominant = 0 if k == 1 else min(k - 1, max(1, round(self.dominant * k)))
        return zip_tokens(tokens.embeds, tokens.encoder_scores, dominant, k - dominant)
