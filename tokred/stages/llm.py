"""The llm stage: after layer K, drop vision tokens from the hidden states and from later layers' cache.

The signal is captured inside layer K's attention call: tokred registers an attention function that
records the post-RoPE q/k rows it needs and then calls the model's own kernel (sdpa, flash, eager) with
the same arguments, so the model never switches to eager attention and no layer runs twice. Layers after
K get their hidden states, mask and rotary embeddings cut by a forward pre-hook.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.kernels import last_query_attention
from tokred.methods.base import Method
from tokred.stages.select import keep_mask
from tokred.tokens import Selection, Span

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


class LLMStage:
    def __init__(self, method: Method, adapter: Adapter) -> None:
        self.method, self.adapter = method, adapter
        self.layer = method.layer
        self.implementation = compat.attention_implementation(adapter.text_config)
        self.stock_config = adapter.layers[self.layer].self_attn.config
        self.armed = False
        self.selection: Selection | None = None

    # -- installation -------------------------------------------------------------------------------
    def install(self) -> list[Callable[[], None]]:
        attn = self.adapter.layers[self.layer].self_attn
        capture_config = compat.with_attention_function(self.stock_config, CAPTURE)
        attn.config, attn._tokred_stage = capture_config, self
        undo = [lambda: setattr(attn, "config", self.stock_config), lambda: delattr(attn, "_tokred_stage")]
        for layer in self.adapter.layers[self.layer + 1 :]:
            undo.append(layer.register_forward_pre_hook(self._before_layer, with_kwargs=True).remove)
        undo += self.adapter.llm_stage_hooks(lambda: self.selection if self.armed else None)
        return undo

    # -- per call -----------------------------------------------------------------------------------
    def arm(
        self,
        spans: list[list[Span]],
        text_mask: torch.Tensor | None,
        seq_len: int,
        on_cut: Callable[[Selection | None], None],
        given: Selection | None = None,
    ) -> None:
        """A prefill with vision: remember the spans and mask as the LLM sees them; choose at layer K
        (or cut there what `given` keeps)."""
        self.armed, self.spans, self.text_mask, self.seq_len = True, spans, text_mask, seq_len
        self.on_cut, self.given = on_cut, given
        self.scores = None
        self.selection = None
        self.pending = True

    def disarm(self) -> None:
        self.armed = False
        self.selection = None

    def step(self, text_mask: torch.Tensor | None, added: int) -> None:
        """A decode step: the LLM's mask and how many tokens followed the prefill, to carry across the cut."""
        self.text_mask, self.added = text_mask, added
        self.pending = True

    def observe(self, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        if not self.armed or self.given is not None or self.selection is not None or query.shape[2] != self.seq_len:
            return
        batch = query.shape[0]
        if self.text_mask is None:
            last = torch.full((batch,), self.seq_len - 1, device=query.device)
        else:
            last = (self.text_mask.bool() * torch.arange(self.seq_len, device=query.device)).argmax(1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        self.scores = last_query_attention(query, key, last, self.text_mask, scale)

    def _before_layer(self, module, args: tuple, kwargs: dict[str, Any]):
        """Pre-hook of every layer after K; the first one of each forward works out what to change."""
        if not self.armed:
            return None
        hidden_in_kwargs = not args
        hidden = kwargs["hidden_states"] if hidden_in_kwargs else args[0]
        if self.pending:
            self.pending = False
            if self.selection is None:
                self.override = self._cut(hidden, kwargs)
                if self.selection is None:  # every token stays: leave this call untouched
                    self.armed = False
                    return None
                hidden = self.selection.take_hidden(hidden)
            else:
                self.override = self._carry(kwargs)
        kwargs.update(self.override)
        if hidden_in_kwargs:
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return (hidden, *args[1:]), kwargs

    def _cut(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Prefill: choose the tokens from layer K's scores; the cut mask and rotary embeddings for the rest."""
        selection = self.given
        if selection is None:
            selection = Selection.from_keep(keep_mask(self.method, self.spans, hidden, self.scores), self.text_mask)
        self.selection = selection
        self.on_cut(selection)
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

    def _carry(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decode step: the same mask over the shorter cache of the layers after K."""
        selection, cos = self.selection, kwargs["position_embeddings"][0]
        key_valid = selection.padding_mask(self.text_mask, self.added).bool()
        if kwargs.get("attention_mask") is None and not selection.has_filler and bool(key_valid.all()):
            return {}
        return {"attention_mask": compat.attention_mask(key_valid, cos.shape[1], self.implementation, cos.dtype)}
