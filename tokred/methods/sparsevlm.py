"""SparseVLM (Zhang et al., ICML 2025): prune the vision tokens after several LLM layers by the attention of
text "raters", the prompt's tokens most relevant to the image, rather than of the last token alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tokred.methods.base import register
from tokred.methods.pdrop import PyramidDrop
from tokred.tokens import VisionTokens


def raters(embeds: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(m,) bool: the text tokens whose relevance to the vision tokens is above the mean, relevance being each
    vision token's softmax over the text of its dot products with it, averaged over the vision tokens (all of
    them when every relevance is equal)."""
    relevance = (embeds.float() @ text.float().T).softmax(-1).mean(0)
    chosen = relevance > relevance.mean()
    return chosen if bool(chosen.any()) else torch.ones_like(chosen)


def rater_scores(tokens: VisionTokens) -> torch.Tensor:
    """(n,) the raters' mean attention onto each of the span's tokens, among the text tokens after the span."""
    if tokens.text_attention is None or tokens.context is None:
        raise RuntimeError("SparseVLM needs the text tokens' attention; it must run in the llm stage")
    sees = tokens.text_attention.sum(-1) > 0  # text before the span cannot attend to it
    if not bool(sees.any()):
        raise ValueError("SparseVLM needs text after the image or video to rate it; this prompt has none")
    attention = tokens.text_attention[sees]
    return attention[raters(tokens.embeds, tokens.context[sees])].mean(0)


@register("sparsevlm", stage="llm")
@dataclass(frozen=True)
class SparseVLM(PyramidDrop):
    """Cuts like PyramidDrop (`layers`, `keep` what survives the last cut, a geometric series before it; by
    default after layers 2, 6 and 15 of 32, the paper's, scaled to the depth), each keeping the tokens the raters
    attend to most at that layer. Raters are the text tokens after the span whose relevance to it (from the
    hidden states) is above the mean. Deliberate differences from the official code: raters are chosen at each
    cut from the hidden states that layer produced (it picks them once, from the LLM's input); heads are
    averaged (v1.5 also reweights them); its recycling, which appends tokens clustered from the best dropped
    ones beyond the budget, is tokred's ``merge=True`` here, so the budget holds exactly."""

    default_cuts: ClassVar[tuple[float, ...]] = (3 / 32, 7 / 32, 16 / 32)
    needs_text_attention: ClassVar[bool] = True

    def importance(self, tokens: VisionTokens) -> torch.Tensor | None:
        return rater_scores(tokens)

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        return rater_scores(tokens).topk(k).indices.sort().values
