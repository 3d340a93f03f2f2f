"""The pre_llm stage: cut vision tokens between the projector and the first LLM layer.

Everything the LLM receives along the sequence is cut together: embeddings, the padding mask, position
ids (for Qwen the 3-D M-RoPE ids, computed on the full sequence by the model before we cut) and the
family's extras. Decode steps keep the model's own positions; only their mask is carried across the cut.
"""

from __future__ import annotations

from typing import Any

import torch

from tokred.adapters.base import Adapter
from tokred.methods.base import Method
from tokred.stages.select import keep_mask
from tokred.tokens import Selection, Span


class PreLLMStage:
    def __init__(self, method: Method, adapter: Adapter) -> None:
        self.method, self.adapter = method, adapter
        self.selection: Selection | None = None

    def prefill(
        self, kwargs: dict[str, Any], spans: list[list[Span]], given: Selection | None = None
    ) -> Selection | None:
        """Choose (or take the `given` selection) and cut; return the selection, None when every token stays."""
        embeds = kwargs["inputs_embeds"]
        selection = given
        if selection is None:
            selection = Selection.from_keep(keep_mask(self.method, spans, embeds), kwargs.get("attention_mask"))
        if selection is None:
            return None
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1], device=embeds.device)[None]
        kwargs["inputs_embeds"] = selection.take_hidden(embeds)
        kwargs["position_ids"] = selection.take_positions(position_ids)
        kwargs["attention_mask"] = selection.padding_mask(kwargs.get("attention_mask"))
        self.adapter.take_text_kwargs(kwargs, selection)
        self.selection = selection
        return selection

    def decode(self, kwargs: dict[str, Any], seen: int, derive_positions: bool) -> None:
        """Carry the cut into a decode step: shorten its mask; fix positions the model derives from the cache."""
        selection = self.selection
        q_len = kwargs["inputs_embeds"].shape[1]
        added = seen - selection.new_len + q_len
        kwargs["attention_mask"] = selection.padding_mask(kwargs.get("attention_mask"), added)
        if derive_positions:
            shift = selection.old_len - selection.new_len
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                device = kwargs["inputs_embeds"].device
                position_ids = torch.arange(seen, seen + q_len, device=device)[None]
            kwargs["position_ids"] = position_ids + shift
