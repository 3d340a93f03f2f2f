"""KIVI: keys quantized per channel, values per token, to 2 or 4 bits, the newest tokens kept exact."""

from __future__ import annotations

from dataclasses import dataclass

from tokred.methods.base import GroupedKV, register


@register("kivi", stage="kv")
@dataclass(frozen=True)
class KIVI(GroupedKV):
    """KIVI (Liu et al., 2024): a key channel's outliers persist across tokens, so keys get a scale and zero per
    channel and `group` tokens, values one per token and `group` channels; the newest `residual` tokens stay in
    full precision and move to the store `group` tokens at a time. Asymmetric min/max with float16 scales and
    zeros, as the paper's code. Departs from it: values move to the store with the keys, `group` tokens at a time
    (the official code moves one each step), so the window holds `residual` to `residual + group - 1` tokens; the
    prompt is stored at the first decode step, before its attention, so every decode step reads what it would."""

    bits: int = 2
    group: int | None = 32
    residual: int = 128

    widths = (2, 4)
    key_axis = "channel"
    value_axis = "token"

    @classmethod
    def example(cls) -> KIVI:
        return cls(group=8, residual=8)  # the tiny zoo models' heads have 16 channels and prompts of tens of tokens
