"""MustDrop (Liu et al., 2024): vision tokens judged over their lifecycle; tokred implements its first two stages
at the llm stage's cut: 2x2 windows of alike tokens stand for one token (local spatial merging), then the
tokens the text attends to, in total or from any one text token, are kept (dual-attention filtering). Its
third stage, output-aware KV-cache pruning while decoding, is not built: it belongs to the kv stage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokred.methods.base import LLMReducer, check_layer, register
from tokred.tokens import VisionTokens


def alike_windows(features: torch.Tensor, grid: tuple[int, int, int] | None, threshold: float) -> torch.Tensor:
    """(n,) bool: the tokens a local spatial merge folds away. The grid is cut into 2x2 windows (per temporal
    slot; a window must fit whole); where a window's mean pairwise cosine similarity is at least `threshold`, its
    last token (in raster order) stands for it and the other three are marked. Nothing without a grid."""
    merged = torch.zeros(len(features), dtype=torch.bool, device=features.device)
    if grid is None:
        return merged
    t, h, w = grid
    cells = torch.arange(t * h * w, device=features.device).view(t, h, w)[:, : h - h % 2, : w - w % 2]
    windows = cells.unflatten(1, (-1, 2)).unflatten(3, (-1, 2)).permute(0, 1, 3, 2, 4).reshape(-1, 4)
    if not len(windows):
        return merged
    unit = F.normalize(features.float(), dim=-1)[windows]  # (windows, 4, d)
    pairwise = unit @ unit.transpose(1, 2)
    similarity = (pairwise.sum((1, 2)) - pairwise.diagonal(dim1=1, dim2=2).sum(1)) / 12
    merged[windows[similarity >= threshold][:, :3].reshape(-1)] = True
    return merged


def dual_attention_order(attention: torch.Tensor) -> torch.Tensor:
    """(n,) the span's tokens from most to least kept by dual-attention filtering of (m, n) text-to-vision
    attention: alternately the next by global attention (summed over the text) and the next by individual
    attention (its largest from any one text token), each token once; at a budget the kept set is the union of
    the two filters' top lists."""
    by_global = attention.sum(0).argsort(descending=True, stable=True).tolist()
    by_individual = attention.amax(0).argsort(descending=True, stable=True).tolist()
    order, seen = [], set()
    for pair in zip(by_global, by_individual, strict=True):
        for token in pair:
            if token not in seen:
                seen.add(token)
                order.append(token)
    return torch.tensor(order, device=attention.device)


@register("mustdrop", stage="llm")
@dataclass(frozen=True)
class MustDrop(LLMReducer):
    """After LLM layer `layer`: a 2x2 window of tokens whose mean pairwise cosine similarity (of the hidden
    states there) is at least `threshold` offers only its last token; the budget goes to the offered tokens in
    dual-attention order (the text tokens after the span: summed attention and largest single attention, taken
    alternately), then, if they fall short, to the others in that order. With ``merge=True`` the dropped tokens
    are folded into their most similar kept one, as the local merge would. Deliberate differences from the
    official code: the local merge runs on the LLM's hidden states at the cut (it merges inside CLIP, for LLaVA
    only); the filter's two thresholds become the budget (its thresholds keep a varying number); the decoding
    stage's output-aware cache policy is not implemented (tokred's kv stage is not built yet)."""

    layer: int = 2
    threshold: float = 0.9
    needs_text_attention: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer(self, "layer", self.layer)
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not -1 <= self.threshold <= 1
        ):
            raise ValueError(f"MustDrop.threshold must be a cosine similarity in [-1, 1], got {self.threshold!r}")

    @classmethod
    def example(cls) -> MustDrop:
        return cls(layer=1, keep=0.25, threshold=0.5)

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        if tokens.text_attention is None:
            raise RuntimeError("MustDrop needs the text tokens' attention; it must run in the llm stage")
        after = tokens.text_attention[tokens.text_attention.sum(-1) > 0]  # text before the span cannot see it
        if not len(after):
            raise ValueError("MustDrop needs text after the image or video to filter it; this prompt has none")
        order = dual_attention_order(after)
        folded = alike_windows(tokens.embeds, tokens.span.grid, self.threshold)[order]
        ranked = torch.cat([order[~folded], order[folded]])
        return ranked[:k].sort().values
