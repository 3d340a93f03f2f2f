"""Temporal dedup: a video's patches that did not change since the last kept frame never reach the encoder.

Most of a video repeats from frame to frame; the vision tower of a Qwen model costs more than the LLM's prefill
on a long clip, so the cheapest token is the one the tower never encodes. The frames stage hands this method
each video's patches grouped as the LLM will see them (one row per LLM token: for Qwen, the 2x2 spatial merge
of 2-frame temporal patches, in the processor's normalised pixels) and encodes only the groups it keeps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from tokred.methods.base import FrameFilter, register


@register("temporal_dedup", stage="frames")
@dataclass(frozen=True)
class TemporalDedup(FrameFilter):
    """Keep a group (one LLM token's patches) when its mean absolute change from the same location in the last
    slot where that location was kept is at least `threshold` (in the processor's normalised pixel units, about
    0.27 of the 0-255 range per unit for CLIP-normalised inputs); a video's first temporal slot is kept whole.
    Comparing against the last *kept* version, not the previous slot, stops a slow drift from escaping below
    the threshold step by step. A slot whose groups are all dropped duplicates what was kept before it, so no
    slot loses everything unless it repeats a kept one. ``threshold=0`` keeps everything (idle)."""

    threshold: float = 0.1

    def __post_init__(self) -> None:
        value = self.threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
            raise ValueError(f"TemporalDedup.threshold must be a number >= 0, got {value!r}")

    @classmethod
    def example(cls) -> TemporalDedup:
        return cls(threshold=0.1)

    @property
    def idle(self) -> bool:
        return self.threshold == 0

    def as_idle(self) -> TemporalDedup:
        return dataclasses.replace(self, threshold=0.0)

    def encodes(self, groups: torch.Tensor) -> torch.Tensor:
        t, m, _ = groups.shape
        if self.idle:
            return torch.ones(t, m, dtype=torch.bool, device=groups.device)
        kept = torch.zeros(t, m, dtype=torch.bool, device=groups.device)
        kept[0] = True
        reference = groups[0].float()
        for slot in range(1, t):
            current = groups[slot].float()
            changed = (current - reference).abs().mean(-1) >= self.threshold
            kept[slot] = changed
            reference = torch.where(changed[:, None], current, reference)
        return kept
