"""Merging on plain tensors: fold the tokens a reducer drops into the ones it keeps.

A reducer with ``merge=True`` keeps the slots its budget says, but no token's content is thrown away: each
dropped token joins the kept token it is most similar to (cosine of the hidden states), and every slot then
carries the importance-weighted mean of its group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokred.tokens import Merge


def nearest_kept(embeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(n,) the slot in [0, k) of the kept token (at `index`) each of the n tokens is most cosine-similar to;
    a kept token is its own slot."""
    unit = F.normalize(embeds.float(), dim=-1)
    index = index.to(embeds.device)
    groups = (unit @ unit[index].T).argmax(-1)
    groups[index] = torch.arange(len(index), device=embeds.device)
    return groups


def group_means(embeds: torch.Tensor, groups: torch.Tensor, k: int, weights: torch.Tensor | None) -> torch.Tensor:
    """(k, d) each group's mean row, each token weighted by `weights` (uniform when None or when a group's
    weights sum to zero); in the dtype of `embeds`."""
    w = torch.ones(len(embeds), device=embeds.device) if weights is None else weights.float().clamp_min(0)
    total = torch.zeros(k, device=embeds.device).index_add_(0, groups, w)
    empty = total[groups] == 0  # a group of weightless tokens: average it evenly
    w = torch.where(empty, 1.0, w)
    total = torch.zeros(k, device=embeds.device).index_add_(0, groups, w)
    sums = torch.zeros(k, embeds.shape[-1], device=embeds.device).index_add_(0, groups, embeds.float() * w[:, None])
    return (sums / total[:, None]).to(embeds.dtype)


def fold_into_kept(embeds: torch.Tensor, index: torch.Tensor, weights: torch.Tensor | None = None) -> Merge:
    """The merge that keeps the slots at `index` (ascending) and folds every other token into its most similar
    kept one, each slot carrying its group's `weights`-weighted mean."""
    groups = nearest_kept(embeds, index)
    return Merge(index, group_means(embeds, groups, len(index), weights), groups)
