"""Run a method over every span of a batch and turn its picks (and merges) into a Selection."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokred.methods.base import TokenReducer
from tokred.tokens import Folded, Selection, Span, VisionTokens


def choose(
    method: TokenReducer,
    spans: list[list[Span]],
    hidden: torch.Tensor,
    padding_mask: torch.Tensor | None,
    scores: torch.Tensor | None = None,
    key_norms: torch.Tensor | None = None,
    encoder_scores: torch.Tensor | None = None,
    text_attention: torch.Tensor | None = None,
    count: Callable[[int, int, VisionTokens], int] | None = None,
) -> Selection | None:
    """The cut `method` makes of a (B, N, d) batch: every text token and the vision tokens it keeps in each
    span, with the merged rows at the kept positions; None when it keeps everything. `scores`, `key_norms`
    and `encoder_scores` are (B, N) per-position signals, where the stage has them; `text_attention` (B, T, N)
    is the attention of each sample's text tokens (in `text_positions` order, zero rows past them) over the
    sequence. `count(sample, span index, tokens)` says how many tokens each span keeps, where the stage
    budgets otherwise than `method.count`.

    Each span gets its own generator, seeded from the method's `seed` and the span's key, so a sample's
    choice is the same alone and in any batch.
    """
    seed = getattr(method, "seed", 0)
    keep = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
    merged = []
    for b, sample in enumerate(spans):
        text = text_positions(sample, hidden.shape[1], None if padding_mask is None else padding_mask[b], hidden.device)
        for s, span in enumerate(sample):
            tokens = VisionTokens(
                span,
                hidden[b, span.positions],
                None if scores is None else scores[b, span.positions],
                None if key_norms is None else key_norms[b, span.positions],
                hidden[b, text],
                None if encoder_scores is None else encoder_scores[b, span.positions],
                None if text_attention is None else text_attention[b, : len(text)][:, span.positions],
            )
            n, k = len(span), method.count(tokens) if count is None else count(b, s, tokens)
            if k == n:
                continue
            generator = span.generator(seed)
            if method.merge:
                merge = method.fold(tokens, k, generator)
                merge.check(n, k, hidden.shape[-1])
                chosen = merge.index.to(span.positions.device)
                merged.append(Folded.of(b, span.positions, merge))
            else:
                chosen = method.pick(tokens, k, generator).to(span.positions.device)
            dropped = torch.ones(n, dtype=torch.bool, device=span.positions.device)
            dropped[chosen] = False
            keep[b, span.positions[dropped]] = False
    return Selection.from_keep(keep, padding_mask, tuple(merged))


def text_positions(sample: list[Span], length: int, padding: torch.Tensor | None, device) -> torch.Tensor:
    """(m,) the positions of one sample's text tokens in a sequence of `length`: neither media nor padding."""
    text = torch.ones(length, dtype=torch.bool, device=device) if padding is None else padding[:length] != 0
    for span in sample:
        text[span.positions.to(device)] = False
    return text.nonzero()[:, 0]
