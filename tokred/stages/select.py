"""Run a method over every span of a batch and turn its picks (and merges) into a Selection."""

from __future__ import annotations

import torch

from tokred.methods.base import TokenMerger, TokenReducer
from tokred.tokens import Selection, Span, VisionTokens


def choose(
    method: TokenReducer,
    spans: list[list[Span]],
    hidden: torch.Tensor,
    padding_mask: torch.Tensor | None,
    scores: torch.Tensor | None = None,
) -> Selection | None:
    """The cut `method` makes of a (B, N, d) batch: every text token and the vision tokens it keeps in each
    span, with a merger's rows at the kept positions; None when it keeps everything.

    Each span gets its own generator, seeded from the method's `seed` and the span's key, so a sample's
    choice is the same alone and in any batch.
    """
    seed = getattr(method, "seed", 0)
    keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    merged = []
    for b, sample in enumerate(spans):
        for span in sample:
            n, k = len(span), method.budget(len(span))
            if k == n:
                continue
            tokens = VisionTokens(
                span,
                hidden[b, span.positions],
                None if scores is None else scores[b, span.positions],
            )
            generator = span.generator(seed)
            if isinstance(method, TokenMerger):
                merge = method.merge(tokens, k, generator)
                merge.check(n, k, hidden.shape[-1])
                chosen = merge.index.to(span.positions.device)
                merged.append((b, span.positions[chosen], merge.rows))
            else:
                chosen = method.select(tokens, k, generator).to(span.positions.device)
            dropped = torch.ones(n, dtype=torch.bool, device=span.positions.device)
            dropped[chosen] = False
            keep[b, span.positions[dropped]] = False
    return Selection.from_keep(keep, padding_mask, tuple(merged))
