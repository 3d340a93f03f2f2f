"""A transformers Cache whose layers hold keys and values group-wise quantized, the newest tokens in full precision.

Each layer keeps two parts (all tensors batch-first, (B, heads, tokens, ...), so beam search reorders them alike):
- the store: keys and values as `Quantized` (tokred.kv.quant): uint8 codes packed along a head's channels,
  (B, H, n, ceil(D / per byte)), and a float16 scale and zero per group, appended a block of tokens at a time.
  Keys grouped per channel (axis "channel") have one scale row per `group` tokens, (B, H, n / group, D); keys or
  values grouped per token (axis "token") one per token and `group` channels, (B, H, n, D / group);
- the residual window: the newest tokens as the model gave them, (B, H, r, D) in `keys` and `values`.

An update first flushes the residual's oldest tokens beyond `residual` into the store, in whole blocks (`group`
tokens where keys go per channel, KIVI's layout; single tokens where everything goes per token), then appends the
new tokens to the residual and returns the dequantized store followed by the residual: what the torch attention
reads (a fused decode kernel can read the packed store directly instead). So a prompt is stored exact until the
first decode step, and a token's precision never changes once it is stored. Blocks start at multiples of the
block size and are quantized alone, so `crop` of the last update's tokens (all generate() crops) leaves every
later read as if that update had not come. Layers are independent: after tokred's llm stage cuts, later layers
hold fewer tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import Cache

from tokred import compat
from tokred.kv.quant import AXES, Quantized, dequantize, quantize

FULL = 16
"""`bits` that keeps keys and values in the model's precision: nothing is quantized (the idle setting)."""


class Scheme(Protocol):
    def make_cache(self, config: Any) -> Cache: ...


def cache_for(model: nn.Module, scheme: Scheme) -> Cache:
    """A fresh cache for `scheme` (a tokred KV scheme) on `model`, for ``model.generate(..., past_key_values=cache)``
    (``cache=`` from transformers 5.24; `compat.cache_argument(model)` names it)."""
    return scheme.make_cache(model.config.get_text_config(decoder=True))


def head_dim(config: Any) -> int:
    """A text config's attention head size: ``head_dim`` where set, else hidden size over heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class QuantizedKVLayer(compat.cache_layer()):
    """One layer's keys and values: a quantized store and a full-precision residual window (see the module)."""

    is_compileable = False
    is_croppable = True  # generate() crops only the last update's tokens, which leaves no trace (see the module)
    is_sliding = False

    def __init__(self, bits: float, key_axis: str, value_axis: str, group: int, residual: int) -> None:
        super().__init__()
        self.bits, self.axes, self.group, self.residual = bits, (key_axis, value_axis), group, residual
        self.block = group if "channel" in self.axes else 1  # tokens a flush moves at a time
        self.store: tuple[Quantized, Quantized] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flush the residual beyond its window, append the new tokens, return all keys and values (dequantized)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._flush()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.store is None:
            return self.keys, self.values
        stored = [dequantize(q).to(self.dtype) for q in self.store]
        return torch.cat([stored[0], self.keys], dim=-2), torch.cat([stored[1], self.values], dim=-2)

    def _flush(self) -> None:
        """Move the residual's oldest whole blocks beyond `residual` tokens into the store."""
        n = (self.keys.shape[-2] - self.residual) // self.block * self.block
        if self.bits == FULL or n <= 0:
            return
        window = (self.keys, self.values)
        new = [quantize(x[..., :n, :], self.bits, self.group, axis) for x, axis in zip(window, self.axes, strict=True)]
        if self.store is not None:
            new = [_concat(old, q) for old, q in zip(self.store, new, strict=True)]
        self.store = tuple(new)
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def stored_length(self) -> int:
        """Tokens in the quantized store."""
        return 0 if self.store is None else self.store[0].shape[-2]

    def get_seq_length(self) -> int:
        return self.stored_length() + self.keys.shape[-2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens. Past the residual, the store's last blocks come back into
        the residual dequantized (as the attention read them), less the dropped tokens."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        if not self.is_initialized or tokens_to_remove == 0:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        stored = self.stored_length()
        if keep < stored:
            whole = keep // self.block * self.block
            back = [dequantize(q)[..., whole:keep, :].to(self.dtype) for q in self.store]
            self.store = tuple(_first(q, whole) for q in self.store) if whole else None
            self.keys, self.values = back
        else:
            self.keys, self.values = self.keys[..., : keep - stored, :], self.values[..., : keep - stored, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dimension operation to every tensor held."""
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.store is not None:
            self.store = tuple(_batch_map(q, fn) for q in self.store)

    def reset(self) -> None:
        self.keys = self.values = self.store = None
        self.is_initialized = False

    def nbytes(self) -> int:
        """Bytes held: the store's codes, scales and zeros, and the residual window."""
        if not self.is_initialized:
            return 0
        residual = sum(t.numel() * t.element_size() for t in (self.keys, self.values))
        return residual + sum(q.nbytes for q in self.store or ())

    def values_held(self) -> int:
        """How many key and value elements the layer stands for (a dense cache would hold this many)."""
        if not self.is_initialized:
            return 0
        batch, heads, _, dim = self.keys.shape
        return 2 * batch * heads * dim * self.get_seq_length()


class QuantizedKVCache(Cache):
    """A Cache of `QuantizedKVLayer`s for a text config: keys grouped along `key_axis`, values along `value_axis`
    ("channel": `group` tokens of one channel; "token": `group` channels of one token; `group` None: a head's
    channels), `bits` a code (16: nothing quantized), the newest `residual` tokens exact."""

    def __init__(
        self, config: Any, bits: float, key_axis: str, value_axis: str, group: int | None, residual: int
    ) -> None:
        for axis in (key_axis, value_axis):
            if axis not in AXES:
                raise ValueError(f"axes must be {' or '.join(map(repr, AXES))}, got {axis!r}")
        d = head_dim(config)
        group = d if group is None else group
        if "token" in (key_axis, value_axis) and d % group:
            divisors = ", ".join(str(k) for k in range(1, d + 1) if d % k == 0)
            raise ValueError(
                f"group={group} must divide the model's head dim {d} (per-token groups run along a head's "
                f"channels); allowed: {divisors}"
            )
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ValueError(f"tokred's quantized KV cache takes full-attention layers only; this model has {types}")
        layer = (bits, key_axis, value_axis, group, residual)
        super().__init__(layers=[QuantizedKVLayer(*layer) for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        """Bytes held, all in: codes, float16 scales and zeros, and the full-precision residual windows."""
        return sum(layer.nbytes() for layer in self.layers)

    def bits_per_value(self) -> float:
        """Bits held per cached key or value element, all in (a bf16 DynamicCache holds 16)."""
        return 8 * self.nbytes() / max(sum(layer.values_held() for layer in self.layers), 1)


def _concat(a: Quantized, b: Quantized) -> Quantized:
    """Two stores of the same layout, `b`'s tokens after `a`'s."""
    return Quantized(
        torch.cat([a.packed, b.packed], dim=-2),
        torch.cat([a.scale, b.scale], dim=-2),
        torch.cat([a.zero, b.zero], dim=-2),
        a.bits,
        a.group,
        a.axis,
        torch.Size((*a.shape[:-2], a.shape[-2] + b.shape[-2], a.shape[-1])),
    )


def _first(q: Quantized, n: int) -> Quantized:
    """A store's first `n` tokens (a whole number of its scale rows)."""
    rows = n // q.group if q.axis == "channel" else n
    shape = torch.Size((*q.shape[:-2], n, q.shape[-1]))
    scale, zero = q.scale[..., :rows, :], q.zero[..., :rows, :]
    return Quantized(q.packed[..., :n, :], scale, zero, q.bits, q.group, q.axis, shape)


def _batch_map(q: Quantized, fn: Callable[[torch.Tensor], torch.Tensor]) -> Quantized:
    """A store with a batch-dimension operation applied to its codes, scales and zeros."""
    packed = fn(q.packed)
    shape = torch.Size((packed.shape[0], *q.shape[1:]))
    return Quantized(packed, fn(q.scale), fn(q.zero), q.bits, q.group, q.axis, shape)
