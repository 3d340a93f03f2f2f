"""The weights stage: at patch time every LLM linear layer the scheme's bit map names below 16 bits becomes a
`QuantLinear` holding its weight packed; nothing runs per call.

The bit map is computed (and a calibration run, where the scheme needs one) when the stage is built, so a map the
model cannot take is refused by `patch()`. The stock modules are kept for `unpatch`, which puts them back bit for
bit; on a GPU they wait in CPU memory, so the device holds only the packed weights while patched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tokred.adapters.base import Adapter
from tokred.kv.cache import FULL
from tokred.methods.base import WeightScheme
from tokred.stages.base import Stage, runtime
from tokred.stages.call import Call
from tokred.weights.linear import QuantLinear
from tokred.weights.quant import WEIGHT_WIDTHS


@runtime
class WeightsStage(Stage):
    name = "weights"

    def __init__(self, method: WeightScheme, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        super().__init__(method, adapter, current)
        modules = dict(adapter.model.named_modules())
        self.bit_map = {name: bits for name, bits in method.bit_map(adapter.model).items() if bits != FULL}
        for name, bits in self.bit_map.items():
            if not isinstance(modules.get(name), nn.Linear):
                found = type(modules[name]).__name__ if name in modules else "nothing"
                raise ValueError(f"{method.name}'s bit map names {name!r}, which is {found}, not an nn.Linear")
            if bits not in WEIGHT_WIDTHS:
                allowed = ", ".join(map(str, (*WEIGHT_WIDTHS, FULL)))
                raise ValueError(f"{method.name}'s bit map gives {name!r} {bits} bits; widths are {allowed}")

    def install(self) -> list[Callable[[], None]]:
        """Swap each mapped layer for its QuantLinear; the undo puts the stock module back where it was."""
        model = self.adapter.model
        undo = []
        for name, bits in self.bit_map.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            stock = getattr(parent, child)
            device = stock.weight.device
            quantized = QuantLinear.from_linear(stock, bits, self.method.group).to(device)
            if device.type != "cpu":
                stock.to("cpu")
            setattr(parent, child, quantized)
            undo.append(_restorer(parent, child, stock, device))
        return undo


def _restorer(parent: nn.Module, child: str, stock: nn.Module, device: torch.device) -> Callable[[], None]:
    def restore() -> None:
        setattr(parent, child, stock.to(device))

    return restore
