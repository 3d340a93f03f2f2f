"""The vision tower's attention as a signal for the stages after it (VisionZip's dominant tokens).

tokred registers an attention function on one tower block (the adapter's `encoder_attention_block`): it
records, from the block's own post-RoPE q/k, the attention each token receives (its [CLS] row where the
tower has one, else the mean over every query of its chunk), then calls the block's stock kernel with the
same arguments, so the tower never switches to eager attention and nothing runs twice. The adapter maps the
tower's tokens to the LLM's (Qwen: the 2x2 patch merger and the window order).

The tower may run before the prefill's Call opens (newer generate() encodes media ahead of it), so what the
block saw waits in `pending` until the prefill takes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.tokens import Span

CAPTURE = "tokred_encoder_capture"
QUERY_BLOCK = 256  # queries per softmax block when every query's attention is averaged


def _capture(module, query, key, value, attention_mask, **kwargs):
    """Attention function of the signal block: note what each token receives, then run the stock kernel."""
    reader: EncoderAttention = module._tokred_encoder
    reader.observe(query, key, kwargs)
    return compat.stock_attention(module, reader.stock_config, query, key, value, attention_mask, **kwargs)


compat.register_attention(CAPTURE, _capture)


def received(query: torch.Tensor, key: torch.Tensor, scale: float, cls: bool) -> torch.Tensor:
    """(B, L) attention each of L tokens receives, head mean: from the first query ([CLS]) or, averaged, from
    every query (softmax over the keys, computed in blocks of queries)."""
    if key.shape[1] != query.shape[1]:  # grouped keys: one per group of query heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
    q, k = query.float(), key.float()
    if cls:
        return torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * scale, -1)[:, :, 0].mean(1)
    total = torch.zeros(q.shape[0], k.shape[2], device=q.device)
    for start in range(0, q.shape[2], QUERY_BLOCK):
        block = torch.softmax(q[:, :, start : start + QUERY_BLOCK] @ k.transpose(-1, -2) * scale, -1)
        total += block.sum((1, 2))
    return total / (q.shape[1] * q.shape[2])


class EncoderAttention:
    """Reads one tower block's attention on every call; `take` hands a prefill its (B, N) scores."""

    def __init__(self, adapter: Adapter, method_name: str) -> None:
        self.adapter = adapter
        self.block = adapter.encoder_attention_block()
        if self.block is None:
            raise ValueError(
                f"{method_name} needs the vision tower's attention, which tokred reads for the families "
                f"llava, llava_onevision, qwen2_vl, qwen2_5_vl and qwen3_vl; not for {adapter.family}"
            )
        self.module = adapter.vision_attention(self.block)
        self.stock_config = self.module.config
        self.implementation = compat.attention_implementation(self.stock_config)
        self.pending: list[torch.Tensor] = []

    def install(self) -> list[Callable[[], None]]:
        module, adapter = self.module, self.adapter
        module.config, module._tokred_encoder = compat.with_attention_function(self.stock_config, CAPTURE), self
        adapter.keep_calls = True
        return [
            lambda: setattr(module, "config", self.stock_config),
            lambda: delattr(module, "_tokred_encoder"),
            lambda: setattr(adapter, "keep_calls", False),
        ]

    def observe(self, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        lengths = kwargs.get("cu_seq_lens_q")
        if lengths is None:  # one call per chunk (or per batch of images)
            self.pending.append(received(query, key, scale, self.adapter.encoder_cls))
            return
        sizes = lengths.diff().tolist()  # flash attention: every chunk in one call
        for q, k in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), strict=True):
            self.pending.append(received(q, k, scale, self.adapter.encoder_cls))

    def take(self, spans: list[list[Span]], shape: torch.Size, device: torch.device) -> torch.Tensor:
        """(B, N) each vision position's score, in the order the tower saw the media; what was pending is used up."""
        chunks, self.pending = self.pending, []
        queues: dict[str, list[torch.Tensor]] = {}
        for kind, score in self.adapter.encoder_token_scores(chunks) if chunks else []:
            queues.setdefault(kind, []).append(score)
        wanted = [span.kind for sample in spans for span in sample]
        found = [kind for kind, queue in queues.items() for _ in queue]
        if sorted(wanted) != sorted(found):
            raise RuntimeError(f"the tower's attention covered media {found}, the prompt holds {wanted}")
        scores = torch.zeros(shape, device=device)
        for b, sample in enumerate(spans):  # the tower saw each kind's media in sequence order
            for span in sample:
                scores[b, span.positions] = queues[span.kind].pop(0).to(device)
        return scores
