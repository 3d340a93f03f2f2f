"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse vision tokens, a max-min diversity problem."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import TokenReducer, register
from tokred.tokens import VisionTokens


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) indices in pick order, greedy for the max-min diversity problem under cosine distance: first the
    token whose nearest neighbour is farthest, then each time the token farthest from everything picked."""
    unit = F.normalize(features.float(), dim=-1)
    distance = 1.0 - unit @ unit.T
    n = len(features)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=features.device)
    nearest = distance.masked_fill(torch.eye(n, dtype=torch.bool, device=features.device), float("inf")).amin(0)
    picked = [int(nearest.argmax())]
    gap = distance[picked[0]].clone()
    for _ in range(k - 1):
        gap[picked] = -float("inf")  # never pick a token twice, even among exact duplicates
        picked.append(int(gap.argmax()))
        gap = torch.minimum(gap, distance[picked[-1]])
    return torch.tensor(picked, device=features.device)


@register("divprune", stage="pre_llm")
@dataclass(frozen=True)
class DivPrune(TokenReducer):
    """Keep the k tokens picked greedily for the largest minimum pairwise cosine distance of their projected
    features (the LLM's input embeddings), as the official code does. Deliberate difference: a token already
    picked is never picked again (the official loop can repeat one when exact duplicates leave every distance
    at zero), so exactly k distinct tokens survive."""

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        return max_min_diverse(tokens.embeds, k).sort().values
