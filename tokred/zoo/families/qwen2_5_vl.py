"""Qwen2.5-VL builder: Qwen2-VL's tokens, geometry and processor, with a windowed vision tower."""

from __future__ import annotations

from functools import partial
from typing import Any

from transformers import PreTrainedConfig, PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLProcessor

from tokred.zoo.families.base import PATCH, QWEN_TOWER, QWEN_VISION_IDS, Builder, ids, mrope, register
from tokred.zoo.families.qwen2_vl import QWEN2_FACTOR, QWEN_TOKENS, qwen2_processor


def _qwen2_5_vl_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """Qwen2.5-VL: as Qwen2-VL plus windowed vision attention.

    ``window_size`` is in pixels: 56 px = 2x2 merged tokens per window, so a 112x112 image has
    four windows. Blocks 0-1 use window attention, block 2 (the last) full attention, like the
    real model's "every 8th block full".
    """
    tower = {
        **QWEN_TOWER,
        "out_hidden_size": text["hidden_size"],
        "patch_size": PATCH,
        "window_size": 2 * QWEN2_FACTOR,
        "fullatt_block_indexes": [2],
        "tokens_per_second": 2,
        **vision,
    }
    text = {**text, "rope_parameters": mrope(text, hw_share=3 / 8, interleaved=False)}
    return Qwen2_5_VLConfig(text_config=text, vision_config=tower, **ids(tok, **QWEN_VISION_IDS))


register("qwen2_5_vl", Builder(QWEN_TOKENS, _qwen2_5_vl_config, partial(qwen2_processor, Qwen2_5_VLProcessor)))
