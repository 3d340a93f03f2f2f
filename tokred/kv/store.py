"""What a quantized cache layer keeps of its older tokens: the store protocol, and the grouped store of int8 and KIVI.

A `Layout` encodes a block of a layer's keys and values (B, heads, tokens, head dim) into a `Store`; a layer appends
the stores of its blocks with `cat`, and reads them back with `dequantize` (the torch path) or hands them to the
fused decode attention (`tokred.kernels.kv_attention`), which reads them packed. Every tensor a store holds is
batch-first, so beam search reorders it with `batch_map`. Two layouts exist: `GroupedLayout` here (each of keys and
values one `Quantized`, grouped per channel or per token) and VidKV's mixed one (`tokred.kv.mixed`).

A layout's `encode` quantizes with the Triton quantize-and-pack kernels where they run (`backend="auto"`: CUDA
tensors, or TRITON_INTERPRET=1) and with the torch reference elsewhere, to the same bytes. The kernels import this
package's quantization (`tokred.kv.quant`), so a layout reaches them as `tokred.kernels.<module>` attributes at
call time (the import resolves while either package is still loading).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

import tokred.kv.quant as quant
from tokred.kernels import kv_pack
from tokred.kv.quant import Quantized

Batchwise = Callable[[torch.Tensor], torch.Tensor]
"""An operation on a tensor's batch dimension (the first): index_select for beam search, repeat_interleave, ..."""


class Store(Protocol):
    """One layer's quantized tokens, in blocks of its layout's `block` tokens."""

    @property
    def tokens(self) -> int:
        """How many tokens it holds."""

    @property
    def nbytes(self) -> int:
        """Bytes held, all in: codes, scales, zeros and any metadata."""

    def cat(self, later: Store) -> Store:
        """This store followed by `later`'s tokens (a store of the same layout)."""

    def first(self, n: int) -> Store:
        """Its first `n` tokens, a whole number of blocks."""

    def batch_map(self, fn: Batchwise) -> Store:
        """The store with `fn` applied to every tensor's batch dimension."""

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 keys and values (B, heads, tokens, head dim), in token order."""


class Layout(Protocol):
    """How a layer quantizes its tokens: `block` tokens at a time, ranked by salience scores where `scored`."""

    block: int
    scored: bool

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        """(B, n) how salient each of a prompt's tokens is, from the layer's keys (B, heads, n, head dim) alone."""

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None, backend: str = "auto"
    ) -> Store:
        """A store of keys and values (B, heads, n, head dim), n a multiple of `block`; `scores` (B, n) where
        `scored`. backend: "auto" (Triton where it runs, else torch), "triton" or "torch"; the same bytes."""


@dataclass(frozen=True)
class GroupedLayout:
    """Keys and values each quantized group-wise to `bits` (`tokred.kv.quantize`): along `key_axis` and
    `value_axis`, `group` tokens of a channel ("channel") or channels of a token ("token") to a scale and zero."""

    bits: float
    key_axis: str
    value_axis: str
    group: int

    scored = False

    @property
    def block(self) -> int:
        """Tokens a block holds: `group` where a scale runs along a channel's tokens, else one."""
        return self.group if "channel" in (self.key_axis, self.value_axis) else 1

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a grouped layout ranks no tokens")

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None, backend: str = "auto"
    ) -> GroupedStore:
        return GroupedStore(
            kv_pack.quantize_pack(keys, self.bits, self.group, self.key_axis, backend=backend),
            kv_pack.quantize_pack(values, self.bits, self.group, self.value_axis, backend=backend),
        )


@dataclass(frozen=True, eq=False)
class GroupedStore:
    """Keys and values as one `Quantized` each: codes packed along a head's channels, (B, H, n, ceil(D / per
    byte)), and a float16 scale and zero per group ((B, H, n / group, D) per channel, (B, H, n, D / group) per
    token). What the fused decode attention reads as they are."""

    keys: Quantized
    values: Quantized

    @property
    def tokens(self) -> int:
        return self.keys.shape[-2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def cat(self, later: GroupedStore) -> GroupedStore:
        return GroupedStore(cat_quantized(self.keys, later.keys), cat_quantized(self.values, later.values))

    def first(self, n: int) -> GroupedStore:
        return GroupedStore(first_quantized(self.keys, n), first_quantized(self.values, n))

    def batch_map(self, fn: Batchwise) -> GroupedStore:
        return GroupedStore(map_quantized(self.keys, fn), map_quantized(self.values, fn))

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        return quant.dequantize(self.keys), quant.dequantize(self.values)


def cat_quantized(a: Quantized, b: Quantized) -> Quantized:
    """Two quantized tensors of the same layout, `b`'s tokens after `a`'s."""
    return Quantized(
        torch.cat([a.packed, b.packed], dim=-2),
        torch.cat([a.scale, b.scale], dim=-2),
        torch.cat([a.zero, b.zero], dim=-2),
        a.bits,
        a.group,
        a.axis,
        torch.Size((*a.shape[:-2], a.shape[-2] + b.shape[-2], a.shape[-1])),
    )


def first_quantized(q: Quantized, n: int) -> Quantized:
    """A quantized tensor's first `n` tokens (a whole number of its scale rows)."""
    rows = n // q.group if q.axis == "channel" else n
    shape = torch.Size((*q.shape[:-2], n, q.shape[-1]))
    scale, zero = q.scale[..., :rows, :], q.zero[..., :rows, :]
    return Quantized(q.packed[..., :n, :], scale, zero, q.bits, q.group, q.axis, shape)


def map_quantized(q: Quantized, fn: Batchwise) -> Quantized:
    """A quantized tensor with a batch-dimension operation applied to its codes, scales and zeros."""
    packed = fn(q.packed)
    shape = torch.Size((packed.shape[0], *q.shape[1:]))
    return Quantized(packed, fn(q.scale), fn(q.zero), q.bits, q.group, q.axis, shape)
