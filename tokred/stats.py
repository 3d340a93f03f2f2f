"""`Stats`: what the last forward or generate call actually kept, per sample and per stage."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Stats:
    """Measured, never nominal.

    vision_tokens: "input", then each stage that ran, mapped to the vision tokens per sample after it (an llm
    method that cuts several times records each earlier cut as "llm@K", K its layer, and the last as "llm"; DyCoke's
    decode pruning records "decode": what the layers after its `decode_layer` read at the latest decode step).
    kept_positions: per stage, the positions in `input_ids` of each sample's vision tokens still present.
    merged_groups: per merging stage, per sample, the `input_ids` positions of each group of tokens that
    became one (groups of one left out), in order of their slots.
    seq_len: LLM layer index -> tokens per sample (padding excluded) from that layer on, where it changes.
    media: per sample, (kind, (t, h, w) token grid or None where the family doesn't make it known) of each
    image or video, in sequence order; its tokens are that sample's "input" positions, in raster order.
    encoder_patches: with a frames stage, the patches of each video of the batch (in batch and sequence order)
    that the vision tower was given ("input") and that it encoded ("frames").
    kv_bytes: with a kv stage, after each forward of the call over its quantized cache: the bytes the cache holds
    all in ("cache") and what a bf16 DynamicCache of the same tokens would hold ("bf16").
    """

    vision_tokens: dict[str, list[int]] = field(default_factory=dict)
    kept_positions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    merged_groups: dict[str, list[list[torch.Tensor]]] = field(default_factory=dict)
    seq_len: dict[int, list[int]] = field(default_factory=dict)
    media: list[list[tuple[str, tuple[int, int, int] | None]]] = field(default_factory=list)
    encoder_patches: dict[str, list[int]] = field(default_factory=dict)
    kv_bytes: dict[str, int] = field(default_factory=dict)

    def record(self, stage: str, positions: list[torch.Tensor]) -> None:
        self.kept_positions[stage] = [p.sort().values.cpu() for p in positions]
        self.vision_tokens[stage] = [int(p.numel()) for p in positions]

    def record_groups(self, stage: str, batch: int, groups: list[tuple[int, list[torch.Tensor]]]) -> None:
        """Record a merging stage's groups, given as (sample, its groups) for each merged span."""
        if not groups:
            return
        per_sample: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        for sample, found in groups:
            per_sample[sample] += [g.sort().values.cpu() for g in found]
        self.merged_groups[stage] = per_sample

    def __str__(self) -> str:
        rows = [f"{stage:>8}: {counts}" for stage, counts in self.vision_tokens.items()]
        rows += [f"layer {layer:>2}: {lengths} tokens" for layer, lengths in sorted(self.seq_len.items())]
        return "vision tokens per sample\n" + "\n".join(rows)
