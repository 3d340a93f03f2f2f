"""Low-bit weights for the linear layers: group-wise quantization with truly packed codes.

`QuantLinear` (the module that runs on them) lives in `tokred.weights.linear` and is not imported here: it stands
on `tokred.kernels`, which stand on this package's `quant`, so importing it here would make a cycle.
"""

from tokred.weights.quant import (
    WEIGHT_WIDTHS,
    QuantizedWeight,
    check_width,
    dequantize_weight,
    quantize_weight,
    unpack_weight_codes,
)

__all__ = [
    "WEIGHT_WIDTHS",
    "QuantizedWeight",
    "check_width",
    "dequantize_weight",
    "quantize_weight",
    "unpack_weight_codes",
]
