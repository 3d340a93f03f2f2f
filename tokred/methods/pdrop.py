"""PyramidDrop (Xing et al., 2025): cut the vision tokens in stages, after each of several LLM layers, keeping
those the last text token attends to most there, so deeper layers see fewer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokred.methods.base import LLMReducer, check_layer, register
from tokred.methods.fastv import most_attended
from tokred.tokens import VisionTokens


@register("pdrop", stage="llm")
@dataclass(frozen=True)
class PyramidDrop(LLMReducer):
    """`layers` are the LLM layers after which it cuts (ascending; text form ``layers=7/15/23``); None, the
    default, splits the LLM into four stages of equal depth as the paper does (after layers 7, 15 and 23 of 32;
    0, 1 and 2 of 4). `keep` (or `keep_tokens`) is what survives the last cut, as for every reducer; the cuts
    keep a geometric series of each span's tokens down to it, so with m cuts each keeps about keep^(1/m) of
    what the previous one left (the paper's λ: keep=0.125 over three cuts is λ=0.5, its setting). With
    ``keep="auto"`` each cut keeps the fewest tokens holding `mass` of that layer's attention (the bounds
    apply to what reached the cut)."""

    keep: float | str = 0.125
    layers: tuple[int, ...] | None = None
    scored: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            object.__setattr__(self, "layers", (self.layers,))
        elif isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.layers is None:
            return
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(
                f"{type(self).__name__}.layers must be one or more LLM layer indices or None, got {self.layers!r}"
            )
        for layer in self.layers:
            check_layer(self, "layers", layer)
        if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"{type(self).__name__}.layers must be strictly ascending, got {self.layers!r}")

    @classmethod
    def example(cls) -> PyramidDrop:
        return cls(layers=(0, 2), keep=0.25)

    default_cuts: ClassVar[tuple[float, ...]] = (8 / 32, 16 / 32, 24 / 32)
    """Where ``layers=None`` cuts, as shares of the depth: layer round(share * depth) - 1 is the last to see all."""

    def cuts(self, depth: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        scaled = (math.floor(depth * share + 0.5) - 1 for share in self.default_cuts)
        return tuple(sorted({k for k in scaled if 0 <= k < depth - 1})) or (0,)

    def count_at(self, progress: float, tokens: VisionTokens, entered: int) -> int:
        if self.keep == "auto":
            return self.count(tokens)
        final = self.budget(entered)
        share = (final / entered) ** progress
        return min(len(tokens.span), max(final, math.floor(entered * share + 0.5)))

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        return most_attended(self, tokens, k)
