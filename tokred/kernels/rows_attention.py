"""Attention of a few query rows per sample over all keys, averaged over heads: SparseVLM's text raters' view.

Torch only: the rows are a prompt's text tokens (tens to hundreds), so the (B, H, T, N) logits stay small next to
the layer's own attention; FastV's single row has the streaming Triton kernel (`last_query.py`).
"""

from __future__ import annotations

import torch


def rows_attention(
    query: torch.Tensor, key: torch.Tensor, rows: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """(B, T, N) float32: for each sample b and row t, the causal softmax attention of query position
    ``rows[b, t]`` over the keys `key_valid` allows, averaged over heads; rows with ``rows[b, t] < 0`` are 0.

    query (B, H, N, D) and key (B, Hkv, N, D) as the attention function receives them (post-RoPE, grouped
    query heads not yet repeated)."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    real = rows >= 0
    q = query.gather(2, rows.clamp_min(0)[:, None, :, None].expand(batch, heads, -1, dim)).float()  # (B, H, T, D)
    q = q.view(batch, kv_heads, heads // kv_heads, -1, dim)
    logits = torch.einsum("bkgtd,bknd->bkgtn", q, key.float()) * scaling
    keys = torch.arange(key.shape[2], device=key.device)
    allowed = keys[None, None, :] <= rows[:, :, None]  # causal, (B, T, N)
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    allowed = allowed & real[:, :, None]
    logits = logits.masked_fill(~allowed[:, None, None], float("-inf"))
    probs = logits.softmax(-1).nan_to_num(0.0)  # a row that may attend to nothing (padding) is all 0
    return probs.mean(dim=(1, 2))
