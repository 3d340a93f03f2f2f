"""Run a method over every span of a batch and turn its picks into a keep mask."""

from __future__ import annotations

import torch

from tokred.methods.base import TokenReducer
from tokred.tokens import Span, VisionTokens


def keep_mask(
    method: TokenReducer,
    spans: list[list[Span]],
    hidden: torch.Tensor,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, N) bool: True for every text token and for the vision tokens `method` keeps in each span.

    Each span gets its own generator, seeded from the method's `seed` and the span's key, so a sample's
    choice is the same alone and in any batch.
    """
    seed = getattr(method, "seed", 0)
    keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    for b, sample in enumerate(spans):
        for span in sample:
            n = len(span)
            if n == 0:
                continue
            tokens = VisionTokens(
                span,
                hidden[b, span.positions],
                None if scores is None else scores[b, span.positions],
            )
            chosen = method.select(tokens, method.budget(n), span.generator(seed)).to(span.positions.device)
            dropped = torch.ones(n, dtype=torch.bool, device=span.positions.device)
            dropped[chosen] = False
            keep[b, span.positions[dropped]] = False
    return keep
