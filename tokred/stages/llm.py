"""The llm stage: after layer K, drop vision tokens from the hidden states and from later layers' cache.

The signal is captured inside layer K's attention call: tokred registers an attention function that
records the post-RoPE q/k rows it needs and then calls the model's own kernel (sdpa, flash, eager) with
the same arguments, so the model never switches to eager attention and no layer runs twice. Layers after
K get their hidden states, mask and rotary embeddings cut by a forward pre-hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.kernels import last_query_attention
from tokred.methods.base import Method
from tokred.stages.base import Stage, runtime
from tokred.stages.call import KEY_NORMS, LAST_QUERY, Call
from tokred.stages.select import choose
from tokred.tokens import Selection

CAPTURE = "tokred_capture"
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def _capture(module, query, key, value, attention_mask, **kwargs):
    """Attention function for layer K: note q/k for the stage, then run the stock kernel unchanged."""
    stage: LLMStage = module._tokred_stage
    stage.observe(query, key, kwargs.get("scaling"))
    patched_config, module.config = module.config, stage.stock_config
    try:
        return compat.attention_kernel(module, stage.implementation)(
            module, query, key, value, attention_mask, **kwargs
        )
    finally:
        module.config = patched_config


compat.register_attention(CAPTURE, _capture)


@dataclass
class Pass:
    """The llm stage's values for one call: the sequence as layer K sees it and what happened at the cut."""

    text_mask: torch.Tensor | None  # the LLM's 2D padding mask (after any earlier cut)
    seq_len: int  # the prefill's length at layer K
    selection: Selection | None = None  # the cut, once made
    active: bool = True  # False once the cut turned out to keep everything
    pending: bool = True  # the next layer hook of this forward has to work out what to change
    override: dict[str, Any] = field(default_factory=dict)  # what every later layer of this forward gets
    added: int = 0  # tokens decoded since the prefill


@runtime
class LLMStage(Stage):
    name = "llm"

    def __init__(self, method: Method, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        super().__init__(method, adapter, current)
        layers = len(adapter.layers)
        if not 0 <= method.layer < layers - 1:
            raise ValueError(
                f"{type(method).__name__}.layer={method.layer} is out of range for this model's "
                f"{layers} LLM layers; allowed: 0 to {layers - 2} (tokens are dropped after layer K)"
            )
        self.implementation = compat.attention_implementation(adapter.text_config)
        if self.implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the llm stage supports attn_implementation {', '.join(SUPPORTED_ATTENTION)}; "
                f"this model uses {self.implementation!r}"
            )
        self.layer = method.layer
        self.stock_config = adapter.attention(self.layer).config

    # -- installation -------------------------------------------------------------------------------
    def install(self) -> list[Callable[[], None]]:
        attn = self.adapter.attention(self.layer)
        capture_config = compat.with_attention_function(self.stock_config, CAPTURE)
        attn.config, attn._tokred_stage = capture_config, self
        undo = [lambda: setattr(attn, "config", self.stock_config), lambda: delattr(attn, "_tokred_stage")]
        for layer in self.adapter.layers[self.layer + 1 :]:
            undo.append(layer.register_forward_pre_hook(self._before_layer, with_kwargs=True).remove)

        def cut() -> Selection | None:
            state = self._state()
            return state.selection if state is not None else None

        undo += self.adapter.inner_cut_hooks(cut)
        return undo

    def _state(self) -> Pass | None:
        """This stage's values for the call in flight, while its cut is (or may still be) in effect."""
        call = self.current()
        state = call.state.get(self.name) if call is not None else None
        return state if state is not None and state.active else None

    # -- per call -----------------------------------------------------------------------------------
    def prefill(self, call: Call) -> None:
        """Remember the mask and length as the LLM sees them; the cut happens after layer K."""
        kwargs = call.kwargs
        call.state[self.name] = Pass(kwargs.get("attention_mask"), kwargs["inputs_embeds"].shape[1])

    def decode(self, call: Call) -> None:
        """The LLM's mask and how many tokens followed the prefill, to carry across the cut."""
        state = call.state.get(self.name)
        if state is None or not state.active:
            return
        state.text_mask = call.kwargs.get("attention_mask")
        state.added = call.seen + call.kwargs["inputs_embeds"].shape[1] - state.seq_len
        state.pending = True

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """Layer K's attention call, on a prefill: the last text query's attention over the keys, and each
        position's key norm."""
        state, call = self._state(), self.current()
        if state is None or self.name in call.given or state.selection is not None or query.shape[2] != state.seq_len:
            return
        batch = query.shape[0]
        if state.text_mask is None:
            last = torch.full((batch,), state.seq_len - 1, device=query.device)
        else:
            last = (state.text_mask.bool() * torch.arange(state.seq_len, device=query.device)).argmax(1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        call.signals[LAST_QUERY] = last_query_attention(query, key, last, state.text_mask, scale)
        call.signals[KEY_NORMS] = key.float().square().sum((1, 3)).sqrt()

    def _before_layer(self, module, args: tuple, kwargs: dict[str, Any]):
        """Pre-hook of every layer after K; the first one of each forward works out what to change."""
        state = self._state()
        if state is None:
            return None
        hidden_in_kwargs = not args
        hidden = kwargs["hidden_states"] if hidden_in_kwargs else args[0]
        if state.pending:
            state.pending = False
            if state.selection is None:
                state.override = self._cut(state, hidden, kwargs)
                if state.selection is None:  # every token stays: leave this call untouched
                    state.active = False
                    return None
                hidden = state.selection.cut_hidden(hidden)
            else:
                state.override = self._carry(state, kwargs)
        kwargs.update(state.override)
        if hidden_in_kwargs:
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return (hidden, *args[1:]), kwargs

    def _cut(self, state: Pass, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Prefill: choose the tokens from layer K's scores; the cut mask and rotary embeddings for the rest."""
        call = self.current()
        selection = call.given.get(self.name)
        if selection is None:
            signals = call.signals
            selection = choose(
                self.method, call.spans, hidden, state.text_mask, signals.get(LAST_QUERY), signals.get(KEY_NORMS)
            )
        state.selection = selection
        call.cut(self.name, selection, layer=self.layer + 1)
        if selection is None:
            return {}
        mask = None
        if kwargs.get("attention_mask") is not None or selection.has_filler:
            mask = compat.attention_mask(selection.key_valid, selection.new_len, self.implementation, hidden.dtype)
        cos, sin = kwargs["position_embeddings"]
        return {
            "attention_mask": mask,
            "position_embeddings": (selection.take_hidden(cos), selection.take_hidden(sin)),
            "position_ids": None,  # only flash attention reads them, to detect packing; cut positions look packed
        }

    def _carry(self, state: Pass, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decode step: the same mask over the shorter cache of the layers after K."""
        selection, cos = state.selection, kwargs["position_embeddings"][0]
        key_valid = selection.padding_mask(state.text_mask, state.added).bool()
        if kwargs.get("attention_mask") is None and not selection.has_filler and bool(key_valid.all()):
            return {}
        return {"attention_mask": compat.attention_mask(key_valid, cos.shape[1], self.implementation, cos.dtype)}
