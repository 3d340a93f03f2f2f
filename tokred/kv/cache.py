"""A transformers Cache whose layers hold keys and values quantized, the newest tokens in full precision.

Each layer keeps two parts (all tensors batch-first, (B, heads, tokens, ...), so beam search reorders them alike):
- the store: the older tokens as the cache's `Layout` encodes them (`tokred.kv.store`: int8's and KIVI's grouped
  store, VidKV's mixed one in `tokred.kv.mixed`), appended a block of tokens at a time;
- the residual window: the newest tokens as the model gave them, (B, H, r, D) in `keys` and `values`.

An update first flushes the residual's oldest tokens beyond `residual` into the store, in whole blocks (`group`
tokens where a scale runs along a channel's tokens; single tokens where everything goes per token), then appends
the new tokens to the residual and returns the dequantized store followed by the residual: what the torch attention
reads. A layer told to (`read_packed`, which tokred's kv stage sets for one decode step whose attention it runs
itself) returns the residual window alone instead, and the fused decode attention reads the store packed
(`tokred.kernels.kv_attention`): no dequantized copy of the store is made. So a prompt is stored exact until the
first decode step, and a token's precision never changes once it is stored. Blocks start at multiples of the block
size and are quantized alone, so `crop` of the last update's tokens (all generate() crops) leaves every later read
as if that update had not come. Layers are independent: after tokred's llm stage cuts, later layers hold fewer
tokens.

Layouts that keep salient tokens at a higher precision (`Layout.scored`) rank each block's tokens by a score per
token: given for the prompt by the kv stage (`take_scores`, from what a pruning stage measured), else the layout's
own (`Layout.score`, from the layer's keys) at the first update after the prompt; tokens generated later score
-inf (they are text, never salient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers import Cache

from tokred import compat
from tokred.kv.quant import AXES
from tokred.kv.store import GroupedLayout, Layout, Store

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

    def __init__(self, layout: Layout | None, residual: int) -> None:
        super().__init__()
        self.layout, self.residual = layout, residual  # layout None: nothing is quantized
        self.block = layout.block if layout is not None else 1  # tokens a flush moves at a time
        self.store: Store | None = None
        self.scores: torch.Tensor | None = None  # (B, r): each window token's salience, for a scored layout
        self.read_packed = False  # set for one update by a caller that reads the store itself (see the module)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[..., :0, :], value_states[..., :0, :]
        self.is_initialized = True

    @property
    def wants_scores(self) -> bool:
        """Whether the layer ranks tokens by salience and has no scores for the prompt in its window yet."""
        scored = self.layout is not None and self.layout.scored
        return scored and self.is_initialized and self.scores is None and self.keys.shape[-2] > 0

    def take_scores(self, scores: torch.Tensor) -> None:
        """Salience (B, r) of the prompt the window holds (r tokens), to rank it by instead of the layout's own."""
        expected = (self.keys.shape[0], self.keys.shape[-2])
        if not self.wants_scores or tuple(scores.shape) != expected:
            raise ValueError(
                f"scores must be (batch, window tokens) = {expected} for a scored layer still holding its prompt; "
                f"got {tuple(scores.shape)} (wants scores: {self.wants_scores})"
            )
        self.scores = scores.float().to(self.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flush the residual beyond its window, append the new tokens, return all keys and values (dequantized),
        or only the residual window when `read_packed` is set."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.wants_scores:
            self.scores = self.layout.score(self.keys)
        self._flush()
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.scores is not None:
            later = self.scores.new_full((key_states.shape[0], key_states.shape[-2]), float("-inf"))
            self.scores = torch.cat([self.scores, later], dim=-1)
        if self.read_packed or self.store is None:
            return self.keys, self.values
        stored = [x.to(self.dtype) for x in self.store.dequantize()]
        return torch.cat([stored[0], self.keys], dim=-2), torch.cat([stored[1], self.values], dim=-2)

    def _flush(self) -> None:
        """Move the residual's oldest whole blocks beyond `residual` tokens into the store."""
        n = (self.keys.shape[-2] - self.residual) // self.block * self.block
        if self.layout is None or n <= 0:
            return
        scores = None if self.scores is None else self.scores[:, :n]
        new = self.layout.encode(self.keys[..., :n, :], self.values[..., :n, :], scores)
        self.store = new if self.store is None else self.store.cat(new)
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]
        if self.scores is not None:
            self.scores = self.scores[:, n:]

    def stored_length(self) -> int:
        """Tokens in the quantized store."""
        return 0 if self.store is None else self.store.tokens

    def get_seq_length(self) -> int:
        return self.stored_length() + self.keys.shape[-2] if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens. Past the residual, the store's last blocks come back into
        the residual dequantized (as the attention read them), less the dropped tokens, scoring -inf."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes minus the number of tokens to remove, got {tokens_to_remove}")
        if not self.is_initialized or tokens_to_remove == 0:
            return
        keep = max(self.get_seq_length() + tokens_to_remove, 0)
        stored = self.stored_length()
        if keep < stored:
            whole = keep // self.block * self.block
            self.keys, self.values = (x[..., whole:keep, :].to(self.dtype) for x in self.store.dequantize())
            self.store = self.store.first(whole) if whole else None
            if self.scores is not None:
                self.scores = self.scores.new_full((self.keys.shape[0], keep - whole), float("-inf"))
        else:
            self.keys, self.values = self.keys[..., : keep - stored, :], self.values[..., : keep - stored, :]
            if self.scores is not None:
                self.scores = self.scores[:, : keep - stored]

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
        if self.scores is not None:
            self.scores = fn(self.scores)
        if self.store is not None:
            self.store = self.store.batch_map(fn)

    def reset(self) -> None:
        self.keys = self.values = self.store = self.scores = None
        self.is_initialized = False

    def nbytes(self) -> int:
        """Bytes held: the store (codes, scales, zeros, metadata), the residual window and its tokens' scores."""
        if not self.is_initialized:
            return 0
        held = [t for t in (self.keys, self.values, self.scores) if t is not None]
        return sum(t.numel() * t.element_size() for t in held) + (self.store.nbytes if self.store else 0)

    def values_held(self) -> int:
        """How many key and value elements the layer stands for (a dense cache would hold this many)."""
        if not self.is_initialized:
            return 0
        batch, heads, _, dim = self.keys.shape
        return 2 * batch * heads * dim * self.get_seq_length()


class QuantizedKVCache(Cache):
    """A Cache of `QuantizedKVLayer`s for a text config, each storing its older tokens in `layout` (None: nothing
    quantized), the newest `residual` tokens exact. `grouped` builds int8's and KIVI's."""

    def __init__(self, config: Any, layout: Layout | None, residual: int) -> None:
        types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if types != {"full_attention"}:
            raise ValueError(f"tokred's quantized KV cache takes full-attention layers only; this model has {types}")
        super().__init__(layers=[QuantizedKVLayer(layout, residual) for _ in range(config.num_hidden_layers)])

    @classmethod
    def grouped(
        cls, config: Any, bits: float, key_axis: str, value_axis: str, group: int | None, residual: int
    ) -> QuantizedKVCache:
        """Keys grouped along `key_axis`, values along `value_axis` ("channel": `group` tokens of one channel;
        "token": `group` channels of one token; `group` None: a head's channels), `bits` a code (16: nothing
        quantized)."""
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
        layout = None if bits == FULL else GroupedLayout(bits, key_axis, value_axis, group)
        return cls(config, layout, residual)

    def nbytes(self) -> int:
        """Bytes held, all in: codes, float16 scales and zeros, metadata and the full-precision residual windows."""
        return sum(layer.nbytes() for layer in self.layers)

    def bits_per_value(self) -> float:
        """Bits held per cached key or value element, all in (a bf16 DynamicCache holds 16)."""
        return 8 * self.nbytes() / max(sum(layer.values_held() for layer in self.layers), 1)
