"""The pre_llm stage: cut vision tokens between the projector and the first LLM layer.

Everything the LLM receives along the sequence is cut together: embeddings, the padding mask, position
ids (for Qwen the 3-D M-RoPE ids, computed on the full sequence by the model before we cut) and the
family's extras. Decode steps keep the model's own positions; only their mask is carried across the cut. A method
that prunes the cache while decoding (`prunes_decode`: DyCoke) also gets that done here (`decode_prune.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred.adapters.base import Adapter
from tokred.methods.base import Method
from tokred.stages.base import Stage, runtime
from tokred.stages.call import Call
from tokred.stages.decode_prune import DecodePruning
from tokred.stages.encoder_attention import EncoderAttention
from tokred.stages.select import choose
from tokred.tokens import Selection


@runtime
class PreLLMStage(Stage):
    name = "pre_llm"

    def __init__(self, method: Method, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        super().__init__(method, adapter, current)
        wants = getattr(method, "needs_encoder_attention", False)
        self.encoder = EncoderAttention(adapter, type(method).__name__) if wants else None
        prunes = getattr(method, "prunes_decode", False)
        self.pruning = DecodePruning(method, adapter, current) if prunes else None

    def install(self) -> list[Callable[[], None]]:
        helpers = [h for h in (self.encoder, self.pruning) if h is not None]
        return [undo for helper in helpers for undo in helper.install()]

    def prefill(self, call: Call) -> None:
        """Choose (or take the call's given selection) and cut every sequence-aligned LLM input."""
        kwargs = call.kwargs
        embeds = kwargs["inputs_embeds"]
        records = self.records(call)  # taken up even when the cut is given
        selection = call.given.get(self.name) or self.select(call, records)
        call.cut(self.name, selection)
        call.llm_len = embeds.shape[1] if selection is None else selection.new_len
        if selection is None:
            return
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(embeds.shape[1], device=embeds.device)[None]
        kwargs["inputs_embeds"] = selection.cut_hidden(embeds)
        kwargs["position_ids"] = selection.take_positions(position_ids)
        kwargs["attention_mask"] = selection.padding_mask(kwargs.get("attention_mask"))
        self.adapter.take_text_kwargs(kwargs, selection)

    def records(self, call: Call) -> Any:
        """What the vision tower recorded for this call's media (here: the encoder signal, where asked for)."""
        embeds = call.kwargs["inputs_embeds"]
        return None if self.encoder is None else self.encoder.take(call.spans, embeds.shape[:2], embeds.device)

    def select(self, call: Call, records: Any) -> Selection | None:
        """The method's cut of the call's LLM inputs (None: it keeps everything)."""
        kwargs = call.kwargs
        return choose(
            self.method, call.spans, kwargs["inputs_embeds"], kwargs.get("attention_mask"), encoder_scores=records
        )

    def decode(self, call: Call) -> None:
        """Carry the cut into a decode step: shorten its mask; fix positions the model derives from the cache."""
        if self.pruning is not None:
            self.pruning.decode(call)
        selection = call.selections.get(self.name)
        if selection is None:
            return
        kwargs, seen = call.kwargs, call.seen
        q_len = kwargs["inputs_embeds"].shape[1]
        added = seen - call.llm_len + q_len  # tokens decoded since the prefill, this one included
        kwargs["attention_mask"] = selection.padding_mask(kwargs.get("attention_mask"), added)
        if call.derive_positions:
            shift = selection.old_len - selection.new_len
            position_ids = kwargs.get("position_ids")
            if position_ids is None:
                device = kwargs["inputs_embeds"].device
                position_ids = torch.arange(seen, seen + q_len, device=device)[None]
            kwargs["position_ids"] = position_ids + shift
