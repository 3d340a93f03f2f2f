"""Bit packing for low-bit KV caches: integer codes stored truly packed, several to a uint8 byte.

A code of a width with `levels` values is one base-`levels` digit, and a byte holds as many digits as fit in 256:
8 // bits codes of 2**bits levels, or 5 ternary codes (3**5 = 243 <= 256, so 1.6 bits a code). Digit i of a row
goes to byte i // per as code * levels**(i % per): for a binary width, at bit (i % per) * bits of its byte, the
first code lowest. Packing is along the last dimension, zero-padded to a multiple of the per-byte count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BITS = (1, 2, 4, 8)  # the binary widths `pack` takes


def per_byte(levels: int) -> int:
    """How many codes of `levels` values fit in one byte: the largest k with levels**k <= 256."""
    per = 1
    while levels ** (per + 1) <= 256:
        per += 1
    return per


def _digit_weights(levels: int, device: torch.device) -> torch.Tensor:
    """(per,) int32: the place value levels**i of digit i within a byte."""
    return levels ** torch.arange(per_byte(levels), dtype=torch.int32, device=device)


def _check_codes(codes: torch.Tensor, levels: int) -> None:
    """A ValueError unless codes is an integer tensor with values in [0, levels)."""
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= levels):
        raise ValueError(
            f"codes must lie in [0, {levels}) for {levels}-level packing; got values in "
            f"[{int(codes.min())}, {int(codes.max())}]"
        )


def pack_codes(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 (..., ceil(n / per)): integer codes (..., n) in [0, levels) packed along the last dimension."""
    _check_codes(codes, levels)
    weights = _digit_weights(levels, codes.device)
    per = len(weights)
    digits = F.pad(codes.to(torch.int32), (0, -codes.shape[-1] % per))
    digits = digits.reshape(*digits.shape[:-1], digits.shape[-1] // per, per)  # reshape: a zero-size lead has no -1
    return (digits * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, levels: int, n: int) -> torch.Tensor:
    """uint8 codes (..., n): the inverse of `pack_codes`, for rows of `n` codes."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    weights = _digit_weights(levels, packed.device)
    per = len(weights)
    if -(-n // per) != packed.shape[-1]:
        raise ValueError(
            f"{n} codes take {-(-n // per)} bytes at {per} a byte, but the last dimension has {packed.shape[-1]}"
        )
    digits = packed.to(torch.int32)[..., None] // weights % levels
    return digits.flatten(-2)[..., :n].to(torch.uint8)


def _binary_levels(bits: int) -> int:
    """2**bits for a width `pack` takes; a ValueError naming the allowed ones otherwise."""
    if bits not in BITS:
        raise ValueError(
            f"bits must be one of {', '.join(map(str, BITS))} (pack_ternary for 3-level codes), got {bits!r}"
        )
    return 2 ** int(bits)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., ceil(n * bits / 8)): `bits`-wide codes (..., n) packed 8 // bits to a byte, first code lowest."""
    return pack_codes(codes, _binary_levels(bits))


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 codes (..., n) from `pack(codes, bits)`; `n` is the unpadded length of the last dimension."""
    return unpack_codes(packed, _binary_levels(bits), n)


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., ceil(n / 5)): codes in {0, 1, 2} as base-3 digits, c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4 a byte."""
    return pack_codes(codes, 3)


def unpack_ternary(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 codes (..., n) in {0, 1, 2} from `pack_ternary`."""
    return unpack_codes(packed, 3, n)


def pack3(codes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., ceil(3 n / 8)): 3-bit codes (..., n) in [0, 8) as one little-endian bit stream, code i at bits
    3i to 3i + 2 (bit j in byte j // 8 at place j % 8), so 8 codes fill 3 bytes and codes 2 and 5 of each 8 straddle
    two. The stream is the codes' bits packed 1 to a bit by `pack_codes`."""
    _check_codes(codes, 8)
    stream = codes.to(torch.int32)[..., None] >> torch.arange(3, device=codes.device) & 1
    return pack_codes(stream.flatten(-2), 2)


def unpack3(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 codes (..., n) in [0, 8) from `pack3`."""
    if packed.shape[-1] != -(-3 * n // 8):
        raise ValueError(f"{n} 3-bit codes take {-(-3 * n // 8)} bytes, but the last dimension has {packed.shape[-1]}")
    stream = unpack_codes(packed, 2, 3 * n).to(torch.int32)
    codes = stream.reshape(*stream.shape[:-1], n, 3) << torch.arange(3, device=packed.device)
    return codes.sum(-1).to(torch.uint8)
