"""What the Qwen-VL families share: token grids from `*_grid_thw` after the spatial patch merger.

generate() in newer transformers encodes images before the prefill and drops `*_grid_thw` from the
forward's inputs, so the adapter also records the grids each `get_*_features` call was given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokred import compat
from tokred.adapters.base import Adapter

Grid = tuple[int, int, int]


class QwenVLAdapter(Adapter):
    """Qwen2-VL layout; M-RoPE positions arrive computed on the full sequence and are cut with the tokens."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.encoded_grids: dict[str, list[Grid]] = {}
        self.encoded_calls: list[tuple[str, torch.Tensor]] = []  # (kind, raw *_grid_thw) per get_*_features call

    @property
    def vision_tower(self) -> nn.Module:
        return self.outer.visual

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    @property
    def projector(self) -> nn.Module:
        return self.vision_tower.merger

    def vision_attention(self, block: int) -> nn.Module:
        return self.vision_blocks[block].attn

    patch_groups = True

    @property
    def output_mergers(self) -> list[nn.Module]:
        return [self.projector]

    @property
    def group_size(self) -> int:
        """Patches per LLM token (the spatial merge's square)."""
        return self.model.config.vision_config.spatial_merge_size**2

    windowed = False
    """Whether the tower holds its merged-token groups in window order (Qwen2.5-VL) instead of raster order."""

    def encoder_attention_block(self) -> int:
        """The last block (Qwen2.5-VL: the last full-attention one)."""
        full = getattr(self.model.config.vision_config, "fullatt_block_indexes", None)
        return max(full) if self.windowed and full else len(self.vision_blocks) - 1

    def encoder_token_scores(self, chunks: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Patch scores (in the tower's order) -> each merged token's mean over its patches, in raster order."""
        scores, calls = torch.cat([c.reshape(-1) for c in chunks]), self.encoded_calls
        self.encoded_calls = []
        unit = self.group_size
        out, at = [], 0
        for kind, grid_thw in calls:
            patches = int(grid_thw.prod(-1).sum())
            merged = scores[at : at + patches].view(-1, unit).mean(-1)
            at += patches
            if self.windowed:
                merged = merged[torch.argsort(compat.window_order(self.vision_tower, grid_thw).to(merged.device))]
            out += [(kind, m) for m in merged.split([t * h * w for t, h, w in self._merged(grid_thw)])]
        if at != len(scores):
            raise RuntimeError(f"the tower's attention covered {len(scores)} patches, its grids {at}")
        return out

    def _merged(self, grids) -> list[Grid]:
        merge = self.model.config.vision_config.spatial_merge_size
        return [(t, h // merge, w // merge) for t, h, w in grids.tolist()]

    def token_counts(self, kind: str, inputs: dict[str, Any]) -> list[int] | None:
        grids = inputs.get(f"{kind}_grid_thw")
        return [] if grids is None else [t * h * w for t, h, w in self._merged(grids)]

    def grids(self, kind: str, inputs: dict[str, Any], counts: list[int]) -> list[Grid | None]:
        given = inputs.get(f"{kind}_grid_thw")
        grids = self._merged(given) if given is not None else self.encoded_grids.get(kind, [])
        if [t * h * w for t, h, w in grids] != counts:
            return [None] * len(counts)
        return grids

    def install(self) -> list[Callable[[], None]]:
        def recorder(kind: str) -> Callable[[dict[str, Any]], None]:
            def record(arguments: dict[str, Any]) -> None:
                grid = arguments.get(f"{kind}_grid_thw")
                if grid is None or (self.encoded_calls and self.encoded_calls[-1][1] is grid):
                    return  # Qwen3-VL's get_video_features hands its very grids on to get_image_features
                self.encoded_grids[kind] = self._merged(grid)
                if self.keep_calls:
                    self.encoded_calls.append((kind, grid))

            return record

        return [compat.wrap_media_features(self.outer, kind, recorder(kind)) for kind in ("image", "video")]
