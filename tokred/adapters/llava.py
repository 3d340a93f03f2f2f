"""LLaVA 1.5 (llava-hf layout): a CLIP tower, a fixed token grid per image, a Llama LLM."""

from __future__ import annotations

from typing import Any

import torch

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
        count = self.side**2 + 1 - self.feature_skip  # with the [CLS] unless it is skipped
        return [count] * (0 if pixels is None else pixels.shape[0])

    def grids(self, kind: str, inputs: dict[str, Any], counts: list[int]) -> list[tuple[int, int, int] | None]:
        return [(1, self.side, self.side)] * len(counts)

    encoder_cls = True
    merges_in_tower = True

    def encoder_attention_block(self) -> int:
        return self.vision_feature_block()

    def encoder_token_scores(self, chunks: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """Each image's [CLS] attention row; the [CLS] entry itself goes unless the strategy feeds it to the LLM."""
        return [("image", row) for row in torch.cat(chunks)[:, self.feature_skip :]]
