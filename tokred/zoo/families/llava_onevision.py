"""LLaVA-OneVision builder: AnyRes image tiles, pooled video frames, ChatML prompts."""

from __future__ import annotations

from typing import Any

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2Config,
    SiglipVisionConfig,
)

from tokred.zoo.families.base import (
    PATCH,
    QWEN_SPECIAL,
    TINY_VIT,
    Builder,
    TokenSpec,
    chatml_template,
    ids,
    register,
)

_ONEVISION_TOKENS = TokenSpec(special=(*QWEN_SPECIAL, "<image>", "<video>"), eos="<|im_end|>", pad="<|endoftext|>")
_ONEVISION_TEMPLATE = chatml_template("'<image>\\n'", "'<video>\\n'")

# OneVision: SigLIP 56x56 tiles (16 tokens each). AnyRes picks a grid of up to 2x2 tiles, so a
# 112x112 image gives 16 (base) + 8*8 (tiles) + 8 (newlines) = 88 tokens, a 56x56 one 36 tokens;
# with several images per prompt each image is 16 + 1 tokens. Video frames are resized to 56x56
# and 2x2-pooled: N frames -> 4 * N + 1 tokens.
_OV_TILE = 56


def _pinpoints(tile: int) -> list[list[int]]:
    return [[tile * h, tile * w] for h in (1, 2) for w in (1, 2)]


def _onevision_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """llava-onevision layout: SigLIP (no head, last layer, all tokens) + Qwen2 text, AnyRes.

    ``image_size`` is the tile side (AnyRes grids of up to 2x2 tiles)."""
    tower = SiglipVisionConfig(
        **{**TINY_VIT, "image_size": image_size or _OV_TILE, "patch_size": PATCH, "vision_use_head": False, **vision}
    )
    return LlavaOnevisionConfig(
        vision_config=tower,
        text_config=Qwen2Config(**text),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_pinpoints(tower.image_size),
        vision_aspect_ratio="anyres_max_9",
        **ids(tok, image_token_index="<image>", video_token_index="<video>"),
    )


def _onevision_processor(
    tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None
) -> ProcessorMixin:
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    size = {"height": tile, "width": tile}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_pinpoints(tile)),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tok,
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=_ONEVISION_TEMPLATE,
    )


register("llava_onevision", Builder(_ONEVISION_TOKENS, _onevision_config, _onevision_processor))
