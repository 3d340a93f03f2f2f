"""FastV (Chen et al., 2024): after LLM layer K, keep the vision tokens the last text token attends to most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokred.methods.base import LLMReducer, check_layer, register
from tokred.tokens import VisionTokens


@register("fastv", stage="llm")
@dataclass(frozen=True)
class FastV(LLMReducer):
    """`layer` is K: layers 0..K see every token, layers after K only the kept ones. Its importance is that
    attention, so ``keep="auto"`` keeps the fewest tokens holding `mass` of it."""

    layer: int = 2
    scored: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self, "layer", self.layer)

    @classmethod
    def example(cls) -> FastV:
        return cls(layer=1, keep=0.25)

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        return most_attended(self, tokens, k)


def most_attended(method: LLMReducer, tokens: VisionTokens, k: int) -> torch.Tensor:
    """(k,) ascending indices of the span's tokens the last text query attends to most at the cut's layer."""
    if tokens.scores is None:
        raise RuntimeError(f"{type(method).__name__} needs attention scores; it must run in the llm stage")
    return tokens.scores.topk(k).indices.sort().values
