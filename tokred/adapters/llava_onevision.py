"""LLaVA-OneVision: anyres images (base view, crops and newline tokens) and pooled video frames.

Token counts per image depend on its size and crops, so spans are the contiguous placeholder runs.
"""

from __future__ import annotations

from tokred.adapters.base import Adapter


class LlavaOnevisionAdapter(Adapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    lmms_base = "llava_hf"
