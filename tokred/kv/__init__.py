"""Low-bit KV caches for transformers VLMs: bit packing and group-wise quantization, the cache's bottom layer."""

from tokred.kv.packing import BITS, pack, pack_codes, pack_ternary, per_byte, unpack, unpack_codes, unpack_ternary
from tokred.kv.quant import AXES, TERNARY, WIDTHS, Quantized, code_levels, dequantize, quantize

__all__ = [
    "AXES",
    "BITS",
    "TERNARY",
    "WIDTHS",
    "Quantized",
    "code_levels",
    "dequantize",
    "pack",
    "pack_codes",
    "pack_ternary",
    "per_byte",
    "quantize",
    "unpack",
    "unpack_codes",
    "unpack_ternary",
]
