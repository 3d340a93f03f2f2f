"""Qwen2-VL builder; its token spec, geometry and processor also serve Qwen2.5-VL."""

from __future__ import annotations

from functools import partial
from typing import Any

from transformers import (
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from tokred.zoo.families.base import (
    PATCH,
    QWEN_SPECIAL,
    QWEN_TEMPLATE,
    QWEN_VISION_IDS,
    Builder,
    TokenSpec,
    ids,
    mrope,
    register,
)

QWEN_TOKENS = TokenSpec(special=QWEN_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>")

# Qwen2-VL / Qwen2.5-VL: patch 14, 2x2 merge -> one token per 28x28 pixels; temporal patch 2.
# Images are resized to 56x56 .. 224x224 (4 .. 64 tokens; 112x112 -> 16 tokens; ``image_size``
# raises the upper side), video frames to at most 112x112 (N frames of 112x112 -> N/2 * 16 tokens;
# with ``image_size`` at most half its side, so 448 px images take 224 px MotionVQA frames whole).
QWEN2_FACTOR = 28


def _qwen2_vl_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """Qwen2-VL: ViT with 2D RoPE and patch merger; Qwen2 text with M-RoPE (t:h:w = 2:3:3)."""
    tower = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text["hidden_size"],  # merger output = LLM width
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **vision,
    }
    text = {**text, "rope_parameters": mrope(text, hw_share=3 / 8, interleaved=False)}
    return Qwen2VLConfig(text_config=text, vision_config=tower, **ids(tok, **QWEN_VISION_IDS))


def qwen2_processor(
    cls: type[ProcessorMixin], tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None
) -> ProcessorMixin:
    """A ``cls`` processor (Qwen2-VL's or Qwen2.5-VL's) with the geometry above."""
    f = QWEN2_FACTOR
    side = (image_size or 8 * f) // f
    image_size = {"shortest_edge": 4 * f * f, "longest_edge": side * side * f * f}
    video_size = {"shortest_edge": 4 * f * f, "longest_edge": max(4, side // 2) ** 2 * f * f}  # per frame
    return cls(
        image_processor=Qwen2VLImageProcessor(size=image_size, patch_size=PATCH, merge_size=2, temporal_patch_size=2),
        # Frames are used as given (no fps sampling), like the real checkpoints. Since ~5.20 an
        # unset ``cap_pixels_per_frame`` warns; 5.17 lacks it here and keeps it as an attribute.
        video_processor=Qwen2VLVideoProcessor(
            size=video_size,
            patch_size=PATCH,
            merge_size=2,
            temporal_patch_size=2,
            do_sample_frames=False,
            cap_pixels_per_frame=False,
        ),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )


register("qwen2_vl", Builder(QWEN_TOKENS, _qwen2_vl_config, partial(qwen2_processor, Qwen2VLProcessor)))
