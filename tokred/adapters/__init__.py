"""Model-family adapters, one file each; `adapter_for` picks one by the model's class."""

from __future__ import annotations

from torch import nn

from tokred.adapters.base import Adapter
from tokred.adapters.llava import LlavaAdapter
from tokred.adapters.llava_onevision import LlavaOnevisionAdapter
from tokred.adapters.qwen2_5_vl import Qwen2_5_VLAdapter
from tokred.adapters.qwen2_vl import Qwen2VLAdapter
from tokred.adapters.qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
)
BY_CLASS = {name: adapter for adapter in ADAPTERS for name in adapter.model_classes}
BY_FAMILY = {adapter.family: adapter for adapter in ADAPTERS}


def adapter_class(family: str) -> type[Adapter]:
    """The adapter class for a checkpoint's `config.model_type`, else a ValueError listing the supported ones."""
    if family not in BY_FAMILY:
        raise ValueError(f"tokred does not support model type {family!r}; supported: {', '.join(sorted(BY_FAMILY))}")
    return BY_FAMILY[family]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for `model` (or for the closest supported base class), else a TypeError listing them."""
    adapter = next((BY_CLASS[c.__name__] for c in type(model).__mro__ if c.__name__ in BY_CLASS), None)
    if adapter is None:
        raise TypeError(
            f"tokred does not support {type(model).__name__}; supported model classes: {', '.join(sorted(BY_CLASS))}"
        )
    return adapter(model)


__all__ = ["ADAPTERS", "Adapter", "adapter_class", "adapter_for"]
