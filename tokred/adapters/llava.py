"""LLaVA 1.5 (llava-hf layout): a CLIP tower, a fixed token grid per image, a Llama LLM."""

from __future__ import annotations

from typing import Any

from tokred.adapters.base import Adapter


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)
    lmms_base = "llava_hf"
    takes_video = False

    @property
    def side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def token_counts(self, kind: str, inputs: dict[str, Any]) -> list[int] | None:
        pixels = inputs.get("pixel_values")
        count = self.side**2 + (self.model.config.vision_feature_select_strategy == "full")
        return [count] * (0 if pixels is None else pixels.shape[0])

    def grids(self, kind: str, inputs: dict[str, Any], counts: list[int]) -> list[tuple[int, int, int] | None]:
        return [(1, self.side, self.side)] * len(counts)
