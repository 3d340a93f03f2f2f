"""int8: every key and value quantized per token to 8 bits, the baseline of the low-bit KV schemes."""

from __future__ import annotations

from dataclasses import dataclass

from tokred.methods.base import GroupedKV, register


@register("int8", stage="kv")
@dataclass(frozen=True)
class Int8(GroupedKV):
    """Keys and values per token: a float16 scale and zero per token and head (per `group` channels where set),
    8-bit codes; 8.25 bits a value at head dim 128. Nothing is kept exact by default (`residual` 0): a token is
    stored quantized from the decode step after it arrives."""

    bits: int = 8
    group: int | None = None
    residual: int = 0

    widths = (8,)
    key_axis = "token"
    value_axis = "token"
