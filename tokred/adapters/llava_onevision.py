"""LLaVA-OneVision: anyres images (base view, crops and newline tokens) and pooled video frames.

Token counts per image depend on its size and crops, so spans are the contiguous placeholder runs. The
encoder signal is the attention each SigLIP token receives at the block the projector reads, laid out onto
the LLM's tokens by the model's own packing (images) and pooling (video); newline tokens score 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred import compat
from tokred.adapters.base import Adapter


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    lmms_base = "llava_hf"

    def __init__(self, model) -> None:
        super().__init__(model)
        self.encoded_calls: list[tuple[str, dict[str, Any]]] = []  # (kind, arguments) per get_*_features call

    merges_in_tower = True
    tower_tokens_are_llm_tokens = False
    whole_frames = True
    trailing_video_tokens = 1  # the newline after a video's frames

    def frame_regions(self, arguments: dict[str, Any]) -> torch.Tensor:
        patch = self.model.config.vision_config.patch_size
        return compat.onevision_frame_regions(self.outer, compat.onevision_clips(arguments), patch)

    def encoder_attention_block(self) -> int:
        return self.vision_feature_block()

    def encoder_token_scores(self, chunks: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """One chunk per tower call (every view or frame of a get_*_features call), in the calls' order."""
        calls, self.encoded_calls = self.encoded_calls, []
        if len(calls) != len(chunks):
            raise RuntimeError(f"the tower ran {len(chunks)} times for {len(calls)} media feature calls")
        out: list[tuple[str, torch.Tensor]] = []
        for (kind, arguments), scores in zip(calls, chunks, strict=True):
            scores = scores[:, self.feature_skip :]
            if kind == "image":
                out += [("image", s) for s in compat.onevision_image_scores(self.outer, scores, arguments)]
            else:
                out += [("video", s) for s in compat.onevision_video_scores(self.outer, scores, arguments)]
        return out

    def install(self) -> list[Callable[[], None]]:
        def recorder(kind: str) -> Callable[[dict[str, Any]], None]:
            def record(arguments: dict[str, Any]) -> None:
                if self.keep_calls:
                    self.encoded_calls.append((kind, arguments))

            return record

        undo = [compat.wrap_media_features(self.outer, "image", recorder("image"), ("image_sizes",))]
        try:
            undo.append(compat.wrap_media_features(self.outer, "video", recorder("video"), compat.ONEVISION_VIDEO))
        except compat.SeamError:
            undo[0]()
            raise
        return undo
