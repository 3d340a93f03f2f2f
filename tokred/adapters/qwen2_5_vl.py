"""Qwen2.5-VL: the Qwen2-VL token layout with a windowed vision tower."""

from tokred.adapters.qwen import QwenVLAdapter


class Qwen2_5_VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
    lmms_base = "qwen2_5_vl"
    windowed = True
