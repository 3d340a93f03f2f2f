"""VisPruner (Zhang et al., ICCV 2025): the tokens the vision tower attends to most, then diverse ones left after
repeatedly dropping duplicates from the rest."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import ByTowerAttention, TokenReducer, register
from tokred.tokens import VisionTokens

DROPS_PER_ROUND = 8
"""Duplicates removed per round of the de-duplication, as in the official code."""


def deduplicate(features: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) of `candidates` (ascending): rounds split the candidates alternately into two sets, and drop the up
    to `DROPS_PER_ROUND` tokens of the first set most cosine-similar to any token of the second, until k remain."""
    unit = F.normalize(features.float(), dim=-1)
    left = candidates
    while len(left) > k:
        first, second = left[::2], left[1::2]
        drop = min(DROPS_PER_ROUND, len(left) - k, len(first))
        closest = (unit[first] @ unit[second].T).amax(-1)
        keep = closest.argsort(descending=True, stable=True)[drop:]
        left = torch.cat([first[keep], second]).sort().values
    return left


@register("vispruner", stage="pre_llm")
@dataclass(frozen=True)
class VisPruner(ByTowerAttention, TokenReducer):
    """`important` is the share of the budget for the tokens with the most attention in the vision tower (the
    same signal as `visionzip`); the rest of the budget goes to the tokens that survive de-duplication of the
    remainder. Deliberate difference from the official code: similarity is that of the projected tokens (it
    uses the tower's features)."""

    important: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.important, bool) or not isinstance(self.important, (int, float)):
            raise ValueError(f"VisPruner.important must be a share in [0, 1], got {self.important!r}")
        if not 0 <= self.important <= 1:
            raise ValueError(f"VisPruner.important must be a share in [0, 1], got {self.important!r}")

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        if tokens.encoder_scores is None:
            raise RuntimeError("VisPruner needs the vision tower's attention; it must run in the pre_llm stage")
        n_important = round(self.important * k)
        order = tokens.encoder_scores.float().argsort(descending=True, stable=True)
        important, rest = order[:n_important], order[n_important:].sort().values
        diverse = deduplicate(tokens.embeds, rest, k - n_important)
        return torch.cat([important, diverse]).sort().values
