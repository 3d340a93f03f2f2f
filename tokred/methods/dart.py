"""DART (Wen et al., 2025): after LLM layer K, keep the tokens that duplicate none of a few pivot tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import LLMReducer, check_layer, register
from tokred.tokens import VisionTokens


def least_duplicated(features: torch.Tensor, pivots: torch.Tensor, k: int) -> torch.Tensor:
    """(k,) indices: the `pivots` first, then for each pivot in turn its share of the rest of the budget, the
    tokens not yet kept that are least cosine-similar to it (shares differ by at most one, earlier pivots
    first)."""
    unit = F.normalize(features.float(), dim=-1)
    kept = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    kept[pivots] = True
    rest = k - len(pivots)
    for i, pivot in enumerate(pivots.tolist()):
        share = rest // len(pivots) + (i < rest % len(pivots))
        similarity = (unit @ unit[pivot]).masked_fill(kept, float("inf"))
        kept[similarity.topk(share, largest=False).indices] = True
    return kept.nonzero()[:, 0]


@register("dart", stage="llm")
@dataclass(frozen=True)
class DART(LLMReducer):
    """`layer` is K; the `pivots` vision tokens with the largest key norm at layer K are kept, and the rest of
    the budget goes to the tokens least similar to them (cosine of the hidden states after layer K), so
    duplicates of the pivots go first. No attention map is needed. Deliberate differences from the official
    code: the key norm is L2, not L1 (rotary embeddings leave L2 unchanged, so a token's norm does not depend
    on its absolute position, and a sample keeps the same tokens alone and in a padded batch); pivots are
    vision tokens only (it also takes text pivots and then drops them); the budget is met exactly (its
    per-pivot top-k over a shrinking set can overlap and fall short)."""

    layer: int = 2
    pivots: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self, "layer", self.layer)
        if isinstance(self.pivots, bool) or not isinstance(self.pivots, int) or self.pivots < 1:
            raise ValueError(f"DART.pivots must be an integer >= 1, got {self.pivots!r}")

    @classmethod
    def example(cls) -> DART:
        return cls(layer=1, keep=0.25, pivots=2)

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        if tokens.key_norms is None:
            raise RuntimeError("DART needs layer K's key norms; it must run in the llm stage")
        pivots = tokens.key_norms.topk(min(self.pivots, k)).indices
        return least_duplicated(tokens.embeds, pivots, k)
