"""Group-wise asymmetric min/max quantization of KV tensors (..., tokens, channels), codes truly packed.

KIVI's two layouts: axis="channel" gives each channel a scale and zero per `group` consecutive tokens (keys, whose
outliers sit in fixed channels), axis="token" gives each token one per `group` consecutive channels (values).
Either way the codes are packed along the channels, so a cache appends tokens as packed rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokred.kv.packing import BITS, pack_codes, unpack_codes

TERNARY = 1.58  # log2(3): three levels, packed 5 to a byte (1.6 bits a code)
WIDTHS = (1, TERNARY, 2, 4, 8)
AXES = ("channel", "token")
# The dimension of x a group runs along; in the grouped view (..., n/g, g, d) or (..., n, d/g, g) the same index
# is the axis of one group's elements.
_GROUP_DIM = {"channel": -2, "token": -1}


def code_levels(bits: float) -> int:
    """How many values a code of this width takes: 2**bits, or 3 for ternary (bits=1.58)."""
    if bits == TERNARY:
        return 3
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, WIDTHS))} (1.58: ternary), got {bits!r}")
    return 2 ** int(bits)


def group_dim(shape: torch.Size, group: int, axis: str) -> int:
    """The dimension of a (..., n, d) tensor that `axis` groups, after checking that `group` divides it."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(map(repr, AXES))}, got {axis!r}")
    if len(shape) < 2:
        raise ValueError(f"expected a (..., tokens, channels) tensor, got shape {tuple(shape)}")
    dim = _GROUP_DIM[axis]
    size = shape[dim]
    if not isinstance(group, int) or group < 1 or size % group:
        name = "tokens" if axis == "channel" else "channels"
        divisors = [k for k in range(1, size + 1) if size % k == 0]
        raise ValueError(
            f"axis={axis!r} groups {name}: group={group!r} must divide the {size} {name} (dim {dim} of shape "
            f"{tuple(shape)}); allowed: {', '.join(map(str, divisors))}"
        )
    return dim


def _grouped(x: torch.Tensor, group: int, axis: str) -> tuple[torch.Tensor, int]:
    """x as float32 viewed (..., n / group, group, d) for axis="channel" or (..., n, d / group, group), and the
    dimension of that view that runs along a group."""
    dim = group_dim(x.shape, group, axis)
    *lead, n, d = x.shape
    shape = (*lead, n // group, group, d) if axis == "channel" else (*lead, n, d // group, group)
    return x.float().reshape(shape), dim


def _to_half(v: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 v as the nearest float16 at or above it (up) or at or below it."""
    h = v.half()
    off = h.float() < v if up else h.float() > v
    return torch.where(off, torch.nextafter(h, torch.full_like(h, float("inf") if up else float("-inf"))), h)


def min_max_grid(grouped: torch.Tensor, dim: int, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int32 codes of float32 `grouped` on each group's `levels`-level min/max grid along `dim` (rounded to the
    nearest level), and the grid's float16 scale and zero (kept as size-1 `dim`): zero rounded down, scale up."""
    zero = _to_half(grouped.amin(dim, keepdim=True), up=False)
    scale = _to_half((grouped.amax(dim, keepdim=True) - zero.float()) / (levels - 1), up=True)
    scale = scale.masked_fill(scale == 0, 1)  # a constant group: every code is 0 whatever the scale
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError("groups overflow float16 scales and zeros: values and ranges must stay within ±65504")
    codes = ((grouped - zero.float()) / scale.float()).clamp(0, levels - 1).round()
    return codes.to(torch.int32), scale, zero


@dataclass(frozen=True, eq=False)
class Quantized:
    """A (..., n, d) tensor quantized group-wise: packed codes and a float16 scale and zero per group.

    Scales and zeros are float16, as KIVI keeps them: half float32's overhead (2-bit codes in groups of 32 hold
    3 bits a value all in, not 4). The zero is rounded down and the scale up to float16, so each group's grid
    still spans its range and dequantizing stays within scale / 2 of every value.
    """

    packed: torch.Tensor  # uint8 (..., n, ceil(d / per byte)): codes packed along the channels
    scale: torch.Tensor  # float16 (..., n / group, d) for axis "channel", (..., n, d / group) for "token"
    zero: torch.Tensor  # float16, shaped like scale: the group's lowest level
    bits: float  # a width of WIDTHS; 1.58 is ternary
    group: int
    axis: str  # "channel" or "token"
    shape: torch.Size  # of the tensor before quantization

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed codes, the scales and the zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    @property
    def bits_per_value(self) -> float:
        """Bits held per quantized value, scales and zeros included."""
        return 8 * self.nbytes / max(self.shape.numel(), 1)


def quantize(x: torch.Tensor, bits: float, group: int, axis: str) -> Quantized:
    """Quantize x (..., n, d) to `bits` a code, one min/max scale and zero per group (the torch reference).

    axis="channel": a group is `group` consecutive tokens of one channel (KIVI's keys); axis="token": `group`
    consecutive channels of one token (KIVI's values). Levels zero + k * scale for k < 2**bits, scale =
    (max - min) / (2**bits - 1) and zero = min (in float16, widened to cover the range), codes rounded to the
    nearest level. bits=1.58 is ternary with the levels {min, (min + max) / 2, max}: the same asymmetric grid as
    the other widths, so it shares their code and error bound and fits groups not centred on zero (values per
    channel), where a symmetric {-a, 0, a} would spend a level on a side with no values.
    """
    levels = code_levels(bits)
    grouped, dim = _grouped(x, group, axis)
    codes, scale, zero = min_max_grid(grouped, dim, levels)
    packed = pack_codes(codes.reshape(x.shape), levels)
    return Quantized(packed, scale.squeeze(dim), zero.squeeze(dim), bits, group, axis, x.shape)


def dequantize(q: Quantized) -> torch.Tensor:
    """float32 tensor of q's original shape: each code's level, zero + code * scale (the reference)."""
    codes, dim = _grouped(unpack_codes(q.packed, code_levels(q.bits), q.shape[-1]), q.group, q.axis)
    return (codes * q.scale.float().unsqueeze(dim) + q.zero.float().unsqueeze(dim)).reshape(q.shape)
