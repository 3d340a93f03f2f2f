"""Decode-time KV pruning (DyCoke's second stage), run by the pre_llm stage for a method that asks
(`prunes_decode`): at each one-token decode step, the layers after the method's `decode_layer` read only the
vision tokens that step's own query attends to most there.

Layer `decode_layer` and every layer after it call a registered attention function, as the llm stage's layer K
does. At the measuring layer it scores the new query against every cached key (post-RoPE, as the layer has them;
no eager attention) and lets the method choose each span's tokens; at the later layers it gathers the chosen
keys and values (with all text and generated ones) before calling the model's own kernel on them. The cache
itself is left whole, so each step chooses among every token again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.kernels import last_query_attention
from tokred.methods.base import Method
from tokred.stages.call import Call
from tokred.stages.llm import SUPPORTED_ATTENTION
from tokred.tokens import Selection

DECODE = "decode"
"""Its key in `Call.state`, and the stage name under which `stats` reports the vision tokens (per sample, in
`input_ids` positions) that the layers after `decode_layer` read at the latest decode step."""
PRUNE = "tokred_decode_prune"


def _prune(module, query, key, value, attention_mask, **kwargs):
    """Attention function of the measuring layer and those after it: measure or gather, then the stock kernel."""
    pruning: DecodePruning = module._tokred_decode
    layer = module._tokred_layer
    if layer == pruning.layer:
        pruning.measure(query, key, kwargs.get("scaling"))
    else:
        key, value, attention_mask = pruning.gather(layer, key, value, attention_mask, query.dtype)
    return compat.stock_attention(module, pruning.stock[layer], query, key, value, attention_mask, **kwargs)


compat.register_attention(PRUNE, _prune)


@dataclass
class Step:
    """One decode step: how many keys every layer holds, and once measured, what the later layers read."""

    length: int
    cut: Selection | None = None  # the positions kept (None: every token stays)
    mask: torch.Tensor | None = None  # the later layers' attention mask over the kept positions


class DecodePruning:
    """The hooks of one patched model's decode pruning; the step in flight lives in its call's `state`."""

    def __init__(self, method: Method, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        self.method, self.adapter, self.current = method, adapter, current
        depth = len(adapter.layers)
        self.layer = method.decode_layer
        if not self.layer < depth - 1:
            raise ValueError(
                f"{type(method).__name__}.decode_layer={self.layer} is out of range for this model's {depth} LLM "
                f"layers; allowed: 0 to {depth - 2} (the layers after it read the pruned cache)"
            )
        self.implementation = compat.attention_implementation(adapter.text_config)
        if self.implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"decode pruning supports attn_implementation {', '.join(SUPPORTED_ATTENTION)}; "
                f"this model uses {self.implementation!r}"
            )
        self.stock = {i: adapter.attention(i).config for i in range(self.layer, depth)}

    def install(self) -> list[Callable[[], None]]:
        undo = []
        for layer, stock in self.stock.items():
            attention = self.adapter.attention(layer)
            attention.config = compat.with_attention_function(stock, PRUNE)
            attention._tokred_decode, attention._tokred_layer = self, layer
            undo.append(functools.partial(_restore, attention, stock))
        return undo

    def decode(self, call: Call) -> None:
        """A decode step starts: arm it when it decodes one token after a prompt that held vision tokens."""
        q_len = call.kwargs["inputs_embeds"].shape[1]
        call.state[DECODE] = Step(call.seen + q_len) if q_len == 1 and any(call.spans or ()) else None

    def _step(self, layer: int, key: torch.Tensor) -> tuple[Call, Step] | None:
        """The call and decode step in flight, if armed; ValueError where `layer` does not hold the whole cache."""
        call = self.current()
        step = call.state.get(DECODE) if call is not None else None
        if step is None:
            return None
        if key.shape[2] != step.length:
            raise ValueError(
                f"decode pruning reads every cached token at each layer, but LLM layer {layer} holds {key.shape[2]} "
                f"keys for {step.length} tokens; it needs layers that attend to the whole cache (no sliding window) "
                "and a cache that returns it all (such as transformers' DynamicCache, not a static one)"
            )
        return call, step

    def measure(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """The measuring layer at a decode step: its query's attention over the cache chooses each span's tokens."""
        found = self._step(self.layer, key)
        if found is None:
            return
        call, step = found
        batch, n, device = query.shape[0], step.length, query.device
        padding = call.kwargs.get("attention_mask")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # The one query sits at the last position: a view repeating it along the sequence lets the last-query
        # kernel (causal up to row `last`) score it against every key.
        last = torch.full((batch,), n - 1, device=device)
        scores = last_query_attention(query.expand(-1, -1, n, -1), key, last, padding, scale)
        keep = torch.ones(batch, n, dtype=torch.bool, device=device)
        inputs, reported = call.positions(), []
        for b, sample in enumerate(call.spans):
            flags = [torch.zeros(0, dtype=torch.bool, device=device)]
            for span in sample:
                positions = span.positions.to(device)
                kept = torch.zeros(len(span), dtype=torch.bool, device=device)
                kept[self.method.decode_select(scores[b, positions])] = True
                keep[b, positions[~kept]] = False
                flags.append(kept)
            reported.append(inputs[b][torch.cat(flags).to(inputs[b].device)])
        step.cut = Selection.from_keep(keep, padding)
        call.stats.record(DECODE, reported)

    def gather(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A later layer: the keys, values and mask its attention reads (the kept ones, where a step chose)."""
        found = self._step(layer, key)
        if found is None or found[1].cut is None:
            return key, value, mask
        step = found[1]
        if step.mask is None:
            step.mask = compat.attention_mask(step.cut.key_valid, 1, self.implementation, dtype)
        return step.cut.take(key, seq_dim=2, batch_dim=0), step.cut.take(value, seq_dim=2, batch_dim=0), step.mask


def _restore(attention: torch.nn.Module, stock) -> None:
    attention.config = stock
    del attention._tokred_decode, attention._tokred_layer
