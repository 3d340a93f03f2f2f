"""The frames stage: the vision tower encodes only the patch groups of a video that its method keeps.

For towers that take a video as a flat list of patches grouped per LLM token (`Adapter.patch_groups`: the Qwen
families), each ``get_video_features`` call arms the stage with its grid; the tower's forward pre-hook asks the
method which groups to keep, and every block then runs on the kept patches alone: hidden states and rotary rows
cut, the packed-sequence ends (``cu_seqlens``: per frame, or per attention window in Qwen2.5-VL's window order)
recounted so each frame or window attends among its kept patches only. The patch merger (and Qwen3-VL's
deepstack mergers) give each dropped group the row of its location's last kept group, so the model's own code
(placeholder counts, scatter into the sequence, M-RoPE positions over the full grid) runs unchanged; the
prefill then drops those tokens as the pre_llm stage cuts, so each kept token keeps its stock t/h/w position.

Why pad back rather than cut ``input_ids`` before the model: the model computes M-RoPE positions, the
placeholder check and Qwen3-VL's timestamps from the full grid; padding keeps all of that stock and the cut
reuses the one path (`Selection`) every later stage and decode step already carries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.methods.base import FrameFilter
from tokred.stages.base import runtime
from tokred.stages.call import Call
from tokred.stages.pre_llm import PreLLMStage
from tokred.tokens import Selection


@dataclass
class Plan:
    """One tower call's cut, in the tower's order: which patches run and which row each group gets back."""

    keep: torch.Tensor  # (N,) bool per patch
    before: torch.Tensor  # (N + 1,) kept patches before each position
    rows: torch.Tensor  # (G,) per group, the row of the kept groups' output it takes
    memo: dict[int, Any]  # what the blocks share, cut once


def last_kept(kept: torch.Tensor) -> torch.Tensor:
    """(t, m) for each group of a (t, m) kept mask, the raster index (slot * m + location) of the group it
    takes its row from: itself where kept, else its location's last kept slot (slot 0 is kept whole)."""
    t, m = kept.shape
    slots = torch.arange(t, device=kept.device)[:, None].expand(t, m)
    source = torch.where(kept, slots, torch.full_like(slots, -1)).cummax(0).values
    return source * m + torch.arange(m, device=kept.device)


class RaggedTower:
    """Runs a Qwen tower on the kept groups of each video; `take` hands the prefill the masks, video by video."""

    def __init__(self, method: FrameFilter, adapter: Adapter) -> None:
        self.method, self.adapter = method, adapter
        self.armed: torch.Tensor | None = None  # the grid of the get_video_features call in flight
        self.plan: Plan | None = None
        self.encoding: list[torch.Tensor] = []  # the masks of the tower call in flight, pending once it succeeds
        self.pending: list[torch.Tensor] = []  # per video encoded, in order: (tokens,) bool, raster order

    def install(self) -> list[Callable[[], None]]:
        tower = self.adapter.vision_tower
        undo = [
            compat.wrap_media_features(self.adapter.outer, "video", self._arm),
            tower.register_forward_pre_hook(self._before_tower, with_kwargs=True).remove,
            tower.register_forward_hook(self._after_tower, always_call=True).remove,  # also when it raises
        ]
        undo += [
            b.register_forward_pre_hook(self._before_block, with_kwargs=True).remove for b in self.adapter.vision_blocks
        ]
        undo += [m.register_forward_hook(self._after_merger).remove for m in self.adapter.output_mergers]
        return undo

    def _arm(self, arguments: dict[str, Any]) -> None:
        self.armed = arguments.get("video_grid_thw")

    def _before_tower(self, module, args: tuple, kwargs: dict[str, Any]) -> None:
        arguments = compat.forward_arguments(module, args, kwargs)
        grid_thw = arguments.get("grid_thw")
        if grid_thw is None or grid_thw is not self.armed:
            return  # images, or a tower call the stage did not arm
        self.armed = None
        patches, unit = arguments["hidden_states"], self.adapter.group_size
        groups = patches.reshape(patches.shape[0] // unit, -1)
        kept, sources, at = [], [], 0
        for t, h, w in grid_thw.tolist():
            m = h * w // unit
            mask = self.method.encodes(groups[at : at + t * m].view(t, m, -1)).to(torch.bool)
            if mask.shape != (t, m) or not bool(mask[0].all()):
                raise RuntimeError(f"{type(self.method).__name__} must keep a (t, m) mask with slot 0 whole")
            kept.append(mask.reshape(-1))
            sources.append(last_kept(mask).reshape(-1) + at)
            at += t * m
        self.encoding = kept
        keep, source = torch.cat(kept), torch.cat(sources)
        if bool(keep.all()):
            return
        if self.adapter.windowed:  # the tower holds groups in window order
            order = compat.window_order(module, grid_thw).to(keep.device)
            position = torch.argsort(order)  # raster group -> its place in the tower's order
            keep, source = keep[order], position[source[order]]
        rank = keep.long().cumsum(0) - 1
        patch_keep = keep.repeat_interleave(unit)
        before = torch.nn.functional.pad(patch_keep.long().cumsum(0), (1, 0))
        self.plan = Plan(patch_keep, before, rank[source], {})

    def _after_tower(self, module, args, output) -> None:
        """The tower call ended: its masks wait for the prefill if it returned (output None: it raised)."""
        if output is not None:
            self.pending += self.encoding
        self.plan, self.encoding = None, []

    def _before_block(self, module, args: tuple, kwargs: dict[str, Any]):
        if self.plan is None:
            return None
        return compat.ragged_block_call(args, kwargs, self.plan.keep, self.plan.before, self.plan.memo)

    def _after_merger(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.plan is None:
            return None
        return output[self.plan.rows.to(output.device)]

    def take(self, call: Call) -> Selection | None:
        """The cut of a prefill whose videos the tower encoded in part: each video's dropped groups."""
        masks, self.pending = self.pending, []
        embeds = call.kwargs["inputs_embeds"]
        videos = [(b, s) for b, sample in enumerate(call.spans) for s in sample if s.kind == "video"]
        if not masks and not videos:
            return None
        if len(masks) != len(videos):
            raise RuntimeError(
                f"the tower encoded {len(masks)} videos under the frames stage; the prompt holds {len(videos)}"
            )
        call.stats.encoder_patches = {
            "input": [len(m) * self.adapter.group_size for m in masks],
            "frames": [int(m.sum()) * self.adapter.group_size for m in masks],
        }
        if all(bool(m.all()) for m in masks):
            return None
        keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        for (b, span), mask in zip(videos, masks, strict=True):
            if len(mask) != len(span):
                raise RuntimeError(f"a video of {len(span)} tokens came with a frames mask of {len(mask)}")
            keep[b, span.positions[~mask.to(span.positions.device)]] = False
        return Selection.from_keep(keep, call.kwargs.get("attention_mask"))


@runtime
class FramesStage(PreLLMStage):
    """Encodes only the video patch groups its `FrameFilter` keeps, and drops the others' tokens at the LLM."""

    name = "frames"

    def __init__(self, method: FrameFilter, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        if not adapter.patch_groups:
            raise ValueError(
                f"{type(method).__name__} runs the vision tower on a video's changed patches only; tokred does that "
                f"for towers that take patch groups (qwen2_vl, qwen2_5_vl, qwen3_vl), not {adapter.family}"
            )
        super().__init__(method, adapter, current)
        self.tower = RaggedTower(method, adapter)

    def install(self) -> list[Callable[[], None]]:
        return self.tower.install()

    def records(self, call: Call) -> Selection | None:
        if self.name in call.given:  # a prompt recomputed without a cache: its cut is reused, its media may not
            self.tower.pending = []  # have been encoded again (generate encodes them once, ahead)
            return None
        return self.tower.take(call)

    def select(self, call: Call, records: Selection | None) -> Selection | None:
        return records
