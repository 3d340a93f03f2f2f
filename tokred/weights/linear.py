"""QuantLinear: an nn.Linear whose weight is held group-wise quantized and multiplied by `dequant_matmul`.

The packed codes, scales and zeros are buffers, so `.to(device)`, `state_dict` and `load_state_dict` carry them.
The float16 scales and zeros are held as their int16 bit patterns: a model-wide `.to(torch.bfloat16)` casts every
floating-point buffer, and would round them; as integers they move with the module and keep their values.
"""

from __future__ import annotations

import torch
from torch import nn

from tokred.kernels.dequant_matmul import dequant_matmul
from tokred.weights.quant import QuantizedWeight, quantize_weight


class QuantLinear(nn.Module):
    """y = x W.T + bias with W (out_features, in_features) quantized to `bits` per `group` input channels."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"weight must be a tokred.weights.QuantizedWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be ({self.out_features},), one per output feature, got {tuple(bias.shape)}")
        self.bits, self.group = weight.bits, weight.group
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scale", weight.scale.view(torch.int16))
        self.register_buffer("zero", weight.zero.view(torch.int16))
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group: int) -> QuantLinear:
        """`linear` with its weight quantized (on the weight's device) and its bias kept as it is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantize_weight(linear.weight.detach(), bits, group), bias)

    @property
    def quantized(self) -> QuantizedWeight:
        """The quantized weight, on the module's device."""
        shape = torch.Size((self.out_features, self.in_features))
        scale, zero = self.scale.view(torch.float16), self.zero.view(torch.float16)
        return QuantizedWeight(self.packed, scale, zero, self.bits, self.group, shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in x's dtype (Triton where it runs, else the reference)."""
        return dequant_matmul(x, self.quantized, self.bias)

    def nbytes(self) -> int:
        """Bytes held: the packed codes, scales and zeros, and the bias."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group={self.group}"
        )
