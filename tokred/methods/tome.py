"""ToMe (Bolya et al., ICLR 2023): merge similar tokens by bipartite soft matching, each token carrying how many
it stands for, so that attention and means stay proportional to the tokens merged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokred.methods.base import EncoderMerger, register
from tokred.tokens import Merge, VisionTokens


def bipartite_merge(
    x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, r: int, protect_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching over a (B, N, d) batch: tokens alternate into sets A (even
    places) and B (odd); each A token's most cosine-similar B token (by `metric`, (B, N, m)) is its match, and
    the r A tokens with the most similar matches merge into them, as means weighted by `sizes` (B, N).

    Returns the (B, N - r, d) tokens (the survivors, in their original order), their sizes, (B, N) where each
    token went in the new sequence and (B, N - r) the old index of each survivor. `protect_first` keeps token 0
    (a [CLS]) out of every merge."""
    batch, n, _ = x.shape
    a, b = torch.arange(0, n, 2, device=x.device), torch.arange(1, n, 2, device=x.device)
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit[:, a] @ unit[:, b].transpose(1, 2)  # (B, |A|, |B|)
    if protect_first:
        similarity[:, 0] = float("-inf")
    best, match = similarity.max(-1)
    merged = best.argsort(dim=-1, descending=True, stable=True)[:, :r]  # the A tokens that merge
    rows = torch.arange(batch, device=x.device)[:, None]
    stays = torch.ones(batch, n, dtype=torch.bool, device=x.device)
    stays[rows, a[merged]] = False
    into = stays.long().cumsum(1) - 1
    into[rows, a[merged]] = into[rows, b[match.gather(1, merged)]]
    weights = sizes.float()
    total = torch.zeros(batch, n - r, device=x.device).scatter_add_(1, into, weights)
    summed = torch.zeros(batch, n - r, x.shape[-1], device=x.device)
    summed.scatter_add_(1, into[..., None].expand(-1, -1, x.shape[-1]), x.float() * weights[..., None])
    survivors = stays.nonzero()[:, 1].view(batch, n - r)
    return (summed / total[..., None]).to(x.dtype), total.to(sizes.dtype), into, survivors


def merge_down(
    x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, k: int, protect_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rounds of `bipartite_merge` (each merging at most A's size) until k tokens are left; a merged token's
    metric is the size-weighted mean of its members'. Returns the tokens, their sizes, (B, N) the slot each
    token went into and (B, k) the index of each slot's surviving token."""
    batch, n, width = x.shape
    into = torch.arange(n, device=x.device).expand(batch, -1)
    origin = into
    while x.shape[1] > k:
        room = (x.shape[1] + 1) // 2 - protect_first  # A's size, less a protected [CLS]
        r = min(x.shape[1] - k, room)
        if r < 1:
            raise ValueError(f"ToMe cannot merge {x.shape[1]} tokens down to {k}")
        both, sizes, step, survivors = bipartite_merge(
            torch.cat([x, metric.to(x)], -1), metric, sizes, r, protect_first
        )
        x, metric = both[..., :width], both[..., width:]
        into, origin = step.gather(1, into), origin.gather(1, survivors)
    return x, sizes, into, origin


@register("tome", stage="encoder")
@dataclass(frozen=True)
class ToMe(EncoderMerger):
    """In CLIP and SigLIP towers (LLaVA, LLaVA-OneVision) it merges between blocks: after each block up to the
    one the LLM's features come from, by that block's keys (head mean), with proportional attention (log size
    added to each key's logits) in the blocks after; the rest of the budget is merged at the tower's output.
    In LLaVA the LLM gets one token per group, at the position of the group's surviving token. Deliberate
    differences from the official code: merges sit between blocks, not between a block's attention and its MLP
    (so no block is modified), and the merge count per block follows the budget (an even share of what must
    go) rather than a fixed r.

    Qwen towers merge right after the 2x2 patch merger, by the merged tokens' own features: inside the tower
    the merger needs each 2x2 group whole and window attention each window whole, so merging there would either
    break them or be so constrained as to merge little; after it, the tokens are exactly what the LLM pays for.
    LLaVA-OneVision's SigLIP merges between blocks as CLIP does (its later blocks run on fewer tokens), but its
    LLM tokens are not its SigLIP tokens one to one (anyres packing unpads the crops and resizes them past a
    ratio, video pooling averages 2x2 tokens), so the tower's groups cannot be carried onto them exactly: every
    token gets its group's row back at the projector's input and the LLM's tokens merge after the packing, by
    their own features (the rows of one tower group are equal, so they merge first)."""

    def reduce(
        self, x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, k: int, protect_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return merge_down(x, metric, sizes, k, protect_first)

    def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
        x = tokens.embeds[None]
        merged, _, into, origin = merge_down(x, x, torch.ones(x.shape[:2], device=x.device), k)
        return Merge(origin[0], merged[0], into[0])
