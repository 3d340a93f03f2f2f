"""What a call cost, measured the same way everywhere (`tokred eval`, the demo, benchmarks): generation-step
timestamps and the bytes a KV cache holds."""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import LogitsProcessor


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
