"""What a call cost, measured the same way everywhere (`tokred eval`, the demo, benchmarks): generation-step
timestamps and the bytes a KV cache holds."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LogitsProcessor

from tokred.kv.cache import head_dim


class StepClock(LogitsProcessor):
    """Timestamps of each generation step: generate() calls its logits processors once per new token, after
    that token's logits exist, so ``ticks[0]`` marks the first token and the gaps the decode steps."""

    def __init__(self) -> None:
        self.ticks: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.ticks.append(time.perf_counter())
        return scores


def kv_bytes(cache: Any) -> int:
    """Bytes a KV cache holds: what it reports itself (``cache.nbytes()``, so a packed low-bit cache counts its
    codes and scales), else every tensor its layers hold (transformers' own caches, the quantized store of its
    QuantizedCache included)."""
    reported = getattr(cache, "nbytes", None)
    if callable(reported):
        return int(reported())
    return sum(tensor_bytes(vars(layer)) for layer in getattr(cache, "layers", ()))


def kv_values(cache: Any, config: Any, batch: int) -> int:
    """How many key and value elements `cache` stands for, for `batch` sequences of the model whose text `config`
    this is (a dense cache would hold this many): 2 x batch x KV heads x head dim x tokens, over its layers."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * batch * heads * head_dim(config) * sum(layer.get_seq_length() for layer in getattr(cache, "layers", ()))


def kv_bits_per_value(cache: Any, config: Any, batch: int) -> float:
    """Bits `cache` holds per key or value element it stands for, all in (`kv_bytes`); a bf16 DynamicCache: 16."""
    values = kv_values(cache, config, batch)
    return 8 * kv_bytes(cache) / values if values else 0.0


def tensor_bytes(held: Any) -> int:
    """Bytes of every tensor in `held`: a tensor (of a quantized subclass: its inner tensors), or a tuple, list or
    dict of them; anything else holds none."""
    if isinstance(held, torch.Tensor):
        if hasattr(held, "__tensor_flatten__"):
            return sum(tensor_bytes(getattr(held, name)) for name in held.__tensor_flatten__()[0])
        return held.numel() * held.element_size()
    if isinstance(held, dict):
        held = list(held.values())
    return sum(tensor_bytes(h) for h in held) if isinstance(held, (list, tuple)) else 0
