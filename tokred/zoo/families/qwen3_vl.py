"""Qwen3-VL builder: the Qwen special tokens plus tool/think tokens, patch 16, DeepStack, interleaved M-RoPE."""

from __future__ import annotations

from typing import Any

from transformers import (
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from tokred.zoo.families.base import (
    QWEN_SPECIAL,
    QWEN_TEMPLATE,
    QWEN_TOWER,
    QWEN_VISION_IDS,
    Builder,
    TokenSpec,
    head_dim,
    ids,
    mrope,
    register,
)

_QWEN3_TOKENS = TokenSpec(
    special=(*QWEN_SPECIAL, "<tool_call>", "</tool_call>", "<think>", "</think>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
)

# Qwen3-VL: patch 16, 2x2 merge -> one token per 32x32 pixels. Images 64x64 .. 256x256 (4 .. 64
# tokens; 112x112 rounds to 128x128 -> 16 tokens). The video pixel budget covers all frames: up
# to 128 * 32 * 32 pixel-frames (8 frames of 112x112 -> 128x128 -> 4 * 16 = 64 tokens).
_QWEN3_PATCH = 16
_QWEN3_FACTOR = 32


def _qwen3_vl_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """Qwen3-VL: ViT with learned + 2D RoPE positions and DeepStack; Qwen3 text, interleaved M-RoPE.

    DeepStack taps vision blocks 0 and 1 of 3 and adds them to LLM layers 0 and 1.
    """
    tower = {
        **QWEN_TOWER,
        "out_hidden_size": text["hidden_size"],
        "patch_size": _QWEN3_PATCH,
        "num_position_embeddings": 64,  # 8x8 learned grid, interpolated to each image's grid
        "deepstack_visual_indexes": [0, 1],
        **vision,
    }
    text = {**text, "head_dim": head_dim(text)}
    text["rope_parameters"] = mrope(text, hw_share=5 / 16, interleaved=True)
    return Qwen3VLConfig(text_config=text, vision_config=tower, **ids(tok, **QWEN_VISION_IDS))


def _qwen3_vl_processor(
    tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None
) -> ProcessorMixin:
    f = _QWEN3_FACTOR
    side = (image_size or 8 * f) // f
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    patches = {"patch_size": _QWEN3_PATCH, "merge_size": 2, "temporal_patch_size": 2}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 4 * f * f, "longest_edge": side * side * f * f}, **norm, **patches
        ),
        # Frames are used as given (the real checkpoint samples 2 fps); the processor then writes
        # "<t seconds>" timestamps assuming 24 fps unless ``video_metadata`` is passed.
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": 8 * f * f, "longest_edge": 128 * f * f},
            do_sample_frames=False,
            cap_pixels_per_frame=False,
            **norm,
            **patches,
        ),
        tokenizer=tok,
        chat_template=QWEN_TEMPLATE,
    )


register("qwen3_vl", Builder(_QWEN3_TOKENS, _qwen3_vl_config, _qwen3_vl_processor))
