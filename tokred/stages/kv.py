"""The kv stage: every generate() call stores its keys and values in the scheme's cache, unless the caller passes one,
and every decode step over a tokred quantized cache attends to its packed store in place.

The cache's `update` quantizes (`tokred.kv.cache`). The scheme builds one cache at patch time, so settings the model
cannot take (a group that does not divide its head dim) are refused by `patch()`, not in the middle of generate().

Decode steps: the stage registers an attention function (`FUSED`) on every LLM layer's attention. A pre-hook on the
attention module marks a one-token step over a `QuantizedKVCache` layer: that layer's update then returns only its
residual window (`read_packed`), and the attention function runs `store_attention` on the packed store (grouped or
VidKV's), the window and the layer's key mask (Triton on CUDA or under TRITON_INTERPRET=1, else the torch
reference), so no dequantized copy of the store is made. Prefills, multi-token queries and other caches go to the
layer's previous attention function unchanged (the model's own kernel, or the llm stage's capture at its layer K,
which observes prefills only, so a fused decode step stands in for it). This holds for a cache the caller passes
(`tokred.kv.cache_for`) as well.

Layouts that keep salient tokens at a higher precision get each layer's prompt scores at the first decode step:
the llm stage's last-query attention (`LAST_QUERY`) for layers that hold the sequence it was measured over (or,
through the llm stage's cut, the tokens kept after it); other layers score their prompt from their own keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.kernels.kv_attention import store_attention
from tokred.kv import QuantizedKVCache, QuantizedKVLayer
from tokred.measure import kv_values
from tokred.methods.base import KVScheme
from tokred.stages.base import Stage, runtime
from tokred.stages.call import LAST_QUERY, Call

FUSED = "tokred_kv"


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Attention function of every LLM layer under the kv stage: the fused decode attention for a layer the
    pre-hook marked, else the layer's previous attention function."""
    previous = module._tokred_kv_previous
    layer: QuantizedKVLayer | None = module.__dict__.get("_tokred_kv_layer")
    if layer is None:
        return compat.stock_attention(module, previous, query, key, value, attention_mask, **kwargs)
    mask = compat.decode_key_mask(attention_mask, query.shape[0], layer.get_seq_length())
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    out = store_attention(query, layer.store, layer.keys, layer.values, scale, key_mask=mask)
    return compat.attention_output(out)


compat.register_attention(FUSED, _attention)


@runtime
class KVStage(Stage):
    name = "kv"

    def __init__(self, method: KVScheme, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        super().__init__(method, adapter, current)
        method.make_cache(adapter.text_config)
        self.cache_name = compat.cache_argument(adapter.model)
        self.llm_cache_name = compat.cache_argument(adapter.language_model)

    def install(self) -> list[Callable[[], None]]:
        undo = []
        for index in range(len(self.adapter.layers)):
            attention = self.adapter.attention(index)
            previous = attention.config
            attention.config = compat.with_attention_function(previous, FUSED)
            attention._tokred_kv_previous = previous
            undo.append(functools.partial(_restore, attention, previous))
            hook = functools.partial(_mark, index=index, name=compat.cache_argument(attention))
            undo.append(attention.register_forward_pre_hook(hook, with_kwargs=True).remove)
            undo.append(attention.register_forward_hook(_unmark, always_call=True).remove)
        llm = self.adapter.language_model
        undo.append(llm.register_forward_hook(self._count, with_kwargs=True).remove)
        return undo

    def _count(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        """After each LLM forward over a tokred quantized cache: its bytes, and a bf16 DynamicCache's, in stats."""
        call = self.current()
        arguments = compat.forward_arguments(module, args, kwargs)
        cache = compat.passed_cache(arguments, self.llm_cache_name)
        if call is None or not isinstance(cache, QuantizedKVCache):
            return
        values = kv_values(cache, self.adapter.text_config, cache.layers[0].keys.shape[0])
        call.stats.kv_bytes = {"cache": cache.nbytes(), "bf16": 2 * values}

    def generate(self, kwargs: dict[str, Any]) -> None:
        """Pass a fresh cache of the scheme, unless the call brings its own, asks for a cache implementation
        or for none."""
        config = kwargs.get("generation_config") or self.adapter.model.generation_config
        if compat.passed_cache(kwargs, self.cache_name) is not None or kwargs.get("cache_implementation"):
            return
        if kwargs.get("use_cache", config.use_cache) is False:  # None: generate's default, a cache
            return
        kwargs[self.cache_name] = self.method.make_cache(self.adapter.text_config)

    def decode(self, call: Call) -> None:
        """First decode step: each layer that ranks its prompt by salience gets the scores the llm stage measured,
        where they cover its tokens (the others score their own keys in their update)."""
        cache = compat.passed_cache(call.kwargs, self.llm_cache_name)
        if not isinstance(cache, QuantizedKVCache):
            return
        for layer in cache.layers:
            if layer.wants_scores:
                scores = prompt_scores(call, layer.keys.shape[-2])
                if scores is not None:
                    layer.take_scores(scores)


def prompt_scores(call: Call, length: int) -> torch.Tensor | None:
    """(B, length) the llm stage's last-query attention over a layer's prompt of `length` tokens: as measured where
    the layer holds that sequence, through the llm stage's last cut where it holds the tokens kept after it; None
    where it covers neither (no llm stage, or a layer before an earlier cut)."""
    scores = call.signals.get(LAST_QUERY)
    if scores is None:
        return None
    if scores.shape[1] == length:
        return scores
    cut = call.selections.get("llm")
    if cut is None or cut.old_len != scores.shape[1] or cut.new_len != length:
        return None
    return scores.gather(1, cut.index.to(scores.device)).masked_fill(~cut.key_valid.to(scores.device), 0)


def _mark(module: nn.Module, args: tuple, kwargs: dict[str, Any], index: int, name: str) -> None:
    """Pre-hook of layer `index`'s attention: a one-token step over a quantized cache's layer is read packed (its
    update returns the window only, the attention function reads the store)."""
    arguments = compat.forward_arguments(module, args, kwargs)
    cache = compat.passed_cache(arguments, name)
    if not isinstance(cache, QuantizedKVCache) or arguments["hidden_states"].shape[1] != 1:
        return
    layer = cache.layers[index]
    layer.read_packed = True
    module._tokred_kv_layer = layer


def _unmark(module: nn.Module, args: tuple, output: Any) -> None:
    """Forward hook (also when the forward raised): the step's packed read is over."""
    layer = module.__dict__.pop("_tokred_kv_layer", None)
    if layer is not None:
        layer.read_packed = False


def _restore(attention: nn.Module, previous: Any) -> None:
    attention.config = previous
    del attention._tokred_kv_previous
