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
    codes and scales), else the sum of its layers' key and value tensors (transformers' own caches)."""
    reported = getattr(cache, "nbytes", None)
    if callable(reported):
        return int(reported())
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
