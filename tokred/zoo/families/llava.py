"""LLaVA-1.5 builder (llava-hf layout, ``USER: <image>`` prompts)."""

from __future__ import annotations

from typing import Any

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
)

from tokred.zoo.families.base import PATCH, TINY_VIT, Builder, TokenSpec, chat_template, ids, register

_LLAVA_TOKENS = TokenSpec(
    special=("<unk>", "<s>", "</s>", "<image>", "<pad>"),
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    unk="<unk>",
)

# LLaVA-1.5 (llava-hf): ``USER: <image>\nquestion ASSISTANT:`` (BOS comes from the tokenizer).
_LLAVA_TEMPLATE = chat_template(
    turn_start="message['role'].upper() + ': '",
    turn_end="' '",
    image="'<image>\\n'",
    video="''",
    generation_prompt="'ASSISTANT:'",
)

# LLaVA: CLIP 56x56, patch 14 -> 16 patches + CLS; "default" strategy drops CLS -> 16 tokens.
_LLAVA_IMAGE = 56


def _llava_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """llava-hf 1.5 layout: CLIP vision tower (penultimate layer, CLS dropped) + Llama text."""
    tower = CLIPVisionConfig(
        **{
            **TINY_VIT,
            "image_size": image_size or _LLAVA_IMAGE,
            "patch_size": PATCH,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
            **vision,
        }
    )
    return LlavaConfig(
        vision_config=tower,
        text_config=LlamaConfig(**text),
        image_seq_length=(tower.image_size // tower.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        **ids(tok, image_token_index="<image>"),
    )


def _llava_processor(tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None) -> ProcessorMixin:
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, removed again by the "default" strategy
        chat_template=_LLAVA_TEMPLATE,
    )


register("llava", Builder(_LLAVA_TOKENS, _llava_config, _llava_processor))
