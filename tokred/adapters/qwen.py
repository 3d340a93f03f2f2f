"""What the Qwen-VL families share: token grids from `*_grid_thw` after the spatial patch merger.

generate() in newer transformers encodes images before the prefill and drops `*_grid_thw` from the
forward's inputs, so the adapter also records the grids each `get_*_features` call was given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from tokred import compat
from tokred.adapters.base import Adapter

Grid = tuple[int, int, int]


class QwenVLAdapter(Adapter):
    """Qwen2-VL layout; M-RoPE positions arrive computed on the full sequence and are cut with the tokens."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.encoded_grids: dict[str, list[Grid]] = {}

    @property
    def vision_tower(self) -> nn.Module:
        return self.outer.visual

    @property
    def vision_blocks(self) -> nn.ModuleList:
        return self.vision_tower.blocks

    @property
    def projector(self) -> nn.Module:
        return self.vision_tower.merger

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
                if arguments.get(f"{kind}_grid_thw") is not None:
                    self.encoded_grids[kind] = self._merged(arguments[f"{kind}_grid_thw"])

            return record

        return [compat.wrap_media_features(self.outer, kind, recorder(kind)) for kind in ("image", "video")]
