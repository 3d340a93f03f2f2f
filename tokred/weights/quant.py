"""Group-wise low-bit quantization of linear weights: packed codes with a float16 scale and zero per group.

A weight (out_features, in_features) is cut into groups of `group` consecutive input channels of one output row,
each quantized on its own asymmetric min/max grid exactly as `tokred.kv.quantize` quantizes a token's channels
(`min_max_grid`: zero rounded down and scale up to float16, so every value stays within scale / 2 of its level).
Codes are packed along the input channels: 2, 4 and 8 bits by `tokred.kv.pack`, 3 bits as a bit stream (`pack3`,
8 codes in 3 bytes), so a row of codes takes ceil(in_features * bits / 8) bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokred.kv.packing import pack, pack3, unpack, unpack3
from tokred.kv.quant import min_max_grid

WEIGHT_WIDTHS = (2, 3, 4, 8)  # code widths; 16 means "leave the layer in its dtype"


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """An (out_features, in_features) weight quantized group-wise along in_features."""

    packed: torch.Tensor  # uint8 (out, ceil(in * bits / 8)): codes packed along the input channels
    scale: torch.Tensor  # float16 (out, in / group)
    zero: torch.Tensor  # float16 (out, in / group): each group's lowest level
    bits: int  # a width of WEIGHT_WIDTHS
    group: int
    shape: torch.Size  # (out, in)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed codes, the scales and the zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    @property
    def bits_per_value(self) -> float:
        """Bits held per weight, scales and zeros included (4-bit codes in groups of 64: 4.5)."""
        return 8 * self.nbytes / max(self.shape.numel(), 1)


def check_width(bits: int, group: int, in_features: int) -> None:
    """A ValueError unless `bits` is a width of WEIGHT_WIDTHS and `group` divides `in_features`."""
    if isinstance(bits, bool) or bits not in WEIGHT_WIDTHS or not isinstance(bits, int):
        raise ValueError(
            f"bits must be one of {', '.join(map(str, WEIGHT_WIDTHS))} (16: leave the layer unquantized), got {bits!r}"
        )
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or in_features % group:
        divisors = [k for k in range(1, in_features + 1) if in_features % k == 0]
        raise ValueError(
            f"group={group!r} must divide the {in_features} input channels; allowed: {', '.join(map(str, divisors))}"
        )


def quantize_weight(w: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    """w (out, in) quantized to `bits` a code with a min/max scale and zero per `group` input channels of a row."""
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D (out_features, in_features) weight, got shape {tuple(w.shape)}")
    out, in_features = w.shape
    check_width(bits, group, in_features)
    grouped = w.detach().float().reshape(out, in_features // group, group)
    codes, scale, zero = min_max_grid(grouped, -1, 2**bits)
    codes = codes.reshape(out, in_features)
    packed = pack3(codes) if bits == 3 else pack(codes, bits)
    return QuantizedWeight(packed, scale.squeeze(-1), zero.squeeze(-1), bits, group, w.shape)


def unpack_weight_codes(q: QuantizedWeight) -> torch.Tensor:
    """uint8 (out, in): q's codes unpacked."""
    n = q.shape[1]
    return unpack3(q.packed, n) if q.bits == 3 else unpack(q.packed, q.bits, n)


def dequantize_weight(q: QuantizedWeight) -> torch.Tensor:
    """float32 (out, in): each code's level, zero + code * scale (the reference)."""
    out, in_features = q.shape
    codes = unpack_weight_codes(q).float().reshape(out, in_features // q.group, q.group)
    return (codes * q.scale.float()[..., None] + q.zero.float()[..., None]).reshape(out, in_features)
