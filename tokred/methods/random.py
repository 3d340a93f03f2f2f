"""Random pruning before the LLM: a seeded, content-blind baseline every method should beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokred.methods.base import TokenReducer, register
from tokred.tokens import VisionTokens


@register("random", stage="pre_llm")
@dataclass(frozen=True)
class Random(TokenReducer):
    """Keep a uniformly random subset of each image's or video's tokens; `seed` makes every call repeatable."""

    seed: int = 0

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        order = torch.randperm(len(tokens.span), generator=generator)
        return order[:k].sort().values
