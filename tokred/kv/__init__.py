"""Low-bit KV caches for transformers VLMs: bit packing, group-wise quantization, and the cache built on them."""

from tokred.kv.cache import FULL, QuantizedKVCache, QuantizedKVLayer, cache_for
from tokred.kv.mixed import MixedLayout, MixedStore
from tokred.kv.packing import BITS, pack, pack_codes, pack_ternary, per_byte, unpack, unpack_codes, unpack_ternary
from tokred.kv.quant import AXES, TERNARY, WIDTHS, Quantized, code_levels, dequantize, quantize
from tokred.kv.store import GroupedLayout, GroupedStore, Layout, Store

__all__ = [
    "AXES",
    "BITS",
    "FULL",
    "GroupedLayout",
    "GroupedStore",
    "Layout",
    "MixedLayout",
    "MixedStore",
    "TERNARY",
    "WIDTHS",
    "Quantized",
    "QuantizedKVCache",
    "QuantizedKVLayer",
    "Store",
    "cache_for",
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
