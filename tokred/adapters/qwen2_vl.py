"""Qwen2-VL."""

from tokred.adapters.qwen import QwenVLAdapter


class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    lmms_base = "qwen2_vl"
