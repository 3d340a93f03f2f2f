"""Qwen3-VL: video frames split by timestamp text, and deepstack features added to the early LLM layers.

The deepstack features are one row per visual token, so they are cut along with the tokens: before the
LLM by the pre_llm stage, and inside it by wrapping `_deepstack_process` for the layers after FastV's K.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tokred import compat
from tokred.adapters.qwen import QwenVLAdapter
from tokred.tokens import Selection


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration",)
    lmms_base = "qwen3_vl"

    @property
    def output_mergers(self) -> list[torch.nn.Module]:
        """The patch merger and the deepstack mergers (rows the early LLM layers add to the visual tokens)."""
        return [self.projector, *self.vision_tower.deepstack_merger_list]

    def take_text_kwargs(self, kwargs: dict[str, Any], selection: Selection) -> None:
        if kwargs.get("visual_pos_masks") is None:
            return
        embeds = kwargs.get("deepstack_visual_embeds") or []
        kwargs["visual_pos_masks"], cut = take_visual(selection, kwargs["visual_pos_masks"], list(embeds))
        if kwargs.get("deepstack_visual_embeds") is not None:
            kwargs["deepstack_visual_embeds"] = cut

    def inner_cut_hooks(self, current: Callable[[], Selection | None]) -> list[Callable[[], None]]:
        def deepstack(stock, hidden_states, visual_pos_masks, visual_embeds):
            selection = current()
            if selection is not None and hidden_states.shape[1] != visual_pos_masks.shape[1]:
                visual_pos_masks, (visual_embeds,) = take_visual(selection, visual_pos_masks, [visual_embeds])
            return stock(hidden_states, visual_pos_masks, visual_embeds)

        return [compat.wrap_deepstack(self.language_model, deepstack)]


def take_visual(
    selection: Selection, visual_pos_masks: torch.Tensor, embeds: list[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cut a (B, N) mask of visual positions and the per-visual-token rows that go with it (deepstack)."""
    rank = visual_pos_masks.flatten().long().cumsum(0).view_as(visual_pos_masks) - 1
    new_mask = selection.take_hidden(visual_pos_masks)
    rows = selection.take_hidden(rank)[new_mask]
    return new_mask, [e[rows.to(e.device)] for e in embeds]
