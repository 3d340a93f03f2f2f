"""The frames stage: the vision tower encodes only the patch groups of a video that its method keeps.

For towers that take a video as a flat list of patches grouped per LLM token (`Adapter.patch_groups`: the Qwen
families), each ``get_video_features`` call arms the stage with its grid; the tower's forward pre-hook asks the
method which groups to keep, and every block then runs on the kept patches alone: hidden states and rotary rows
cut, the packed-sequence ends (``cu_seqlens``: per frame, or per attention window in Qwen2.5-VL's window order)
recounted so each frame or window attends among its kept patches only. The patch merger (and Qwen3-VL's
deepstack mergers) give each dropped group the row of its location's last kept group, so the model's own code
(placeholder counts, scatter into the sequence, M-RoPE positions over the full grid) runs unchanged; the
prefill then drops those tokens as the pre_llm stage cuts, so each kept token keeps its stock t/h/w position.

For towers that encode a video's frames as whole images (`Adapter.whole_frames`: LLaVA-OneVision's SigLIP), the
method sees each LLM token's region (the patches its pooling reads), the tower encodes only the frames with a
kept region, dropped frames take their video's last encoded frame's rows at the projector, and the prefill drops
every token the method left.

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


@dataclass
class Encoded:
    """One video the tower encoded under the stage: which of its LLM tokens carry features of their own (raster
    order; the others repeat an earlier frame's), and how many patches the tower was given and encoded."""

    keep: torch.Tensor  # (tokens,) bool
    given: int
    encoded: int


class Tower:
    """What both ways of encoding part of a video share: the videos of the tower call in flight, pending for the
    prefill once the call returns, and `take`, which turns them into the prefill's cut."""

    def __init__(self, method: FrameFilter, adapter: Adapter) -> None:
        self.method, self.adapter = method, adapter
        self.encoding: list[Encoded] = []  # the videos of the tower call in flight, pending once it succeeds
        self.pending: list[Encoded] = []  # per video encoded, in order

    def install(self) -> list[Callable[[], None]]:
        raise NotImplementedError

    def _keeps(self, groups: torch.Tensor) -> torch.Tensor:
        """The method's (t, m) mask for one video's (t, m, d) groups, checked: slot 0 is always whole."""
        t, m = groups.shape[:2]
        mask = self.method.encodes(groups).to(torch.bool)
        if mask.shape != (t, m) or not bool(mask[0].all()):
            raise RuntimeError(f"{type(self.method).__name__} must keep a (t, m) mask with slot 0 whole")
        return mask

    def _ended(self, returned: bool) -> None:
        """The tower call ended: its videos wait for the prefill if it returned (not if it raised)."""
        if returned:
            self.pending += self.encoding
        self.encoding = []

    def take(self, call: Call) -> Selection | None:
        """The cut of a prefill whose videos the tower encoded in part: each video's tokens left to repeat."""
        videos, self.pending = self.pending, []
        embeds = call.kwargs["inputs_embeds"]
        spans = [(b, s) for b, sample in enumerate(call.spans) for s in sample if s.kind == "video"]
        if not videos and not spans:
            return None
        if len(videos) != len(spans):
            raise RuntimeError(
                f"the tower encoded {len(videos)} videos under the frames stage; the prompt holds {len(spans)}"
            )
        call.stats.encoder_patches = {"input": [v.given for v in videos], "frames": [v.encoded for v in videos]}
        if all(bool(v.keep.all()) for v in videos):
            return None
        keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        for (b, span), video in zip(spans, videos, strict=True):
            if len(video.keep) != len(span):
                raise RuntimeError(f"a video of {len(span)} tokens came with a frames mask of {len(video.keep)}")
            keep[b, span.positions[~video.keep.to(span.positions.device)]] = False
        return Selection.from_keep(keep, call.kwargs.get("attention_mask"))


class RaggedTower(Tower):
    """Runs a Qwen tower on the kept patch groups of each video (`Adapter.patch_groups`)."""

    def __init__(self, method: FrameFilter, adapter: Adapter) -> None:
        super().__init__(method, adapter)
        self.armed: torch.Tensor | None = None  # the grid of the get_video_features call in flight
        self.plan: Plan | None = None

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
            mask = self._keeps(groups[at : at + t * m].view(t, m, -1))
            kept.append(mask.reshape(-1))
            sources.append(last_kept(mask).reshape(-1) + at)
            at += t * m
        self.encoding = [Encoded(k, len(k) * unit, int(k.sum()) * unit) for k in kept]
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
        self._ended(output is not None)  # output None: the call raised
        self.plan = None

    def _before_block(self, module, args: tuple, kwargs: dict[str, Any]):
        if self.plan is None:
            return None
        return compat.ragged_block_call(args, kwargs, self.plan.keep, self.plan.before, self.plan.memo)

    def _after_merger(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        if self.plan is None:
            return None
        return output[self.plan.rows.to(output.device)]


class FrameTower(Tower):
    """Runs a tower that encodes a video's frames as a batch of whole images (`Adapter.whole_frames`: LLaVA-OneVision)
    on the frames where the method keeps a token's region; the others take the output rows of their video's last
    encoded frame, and the prefill drops every token the method left (each frame's unchanged regions too)."""

    def __init__(self, method: FrameFilter, adapter: Adapter) -> None:
        super().__init__(method, adapter)
        self.armed: tuple[int, list[torch.Tensor], torch.Tensor] | None = None  # frames, masks, frames kept
        self.rows: torch.Tensor | None = None  # per frame given, the row of the encoded frames it takes

    def install(self) -> list[Callable[[], None]]:
        tower = self.adapter.vision_tower
        return [
            compat.wrap_media_features(self.adapter.outer, "video", self._arm, compat.ONEVISION_VIDEO),
            tower.register_forward_pre_hook(self._before_tower, with_kwargs=True).remove,
            tower.register_forward_hook(self._after_tower, always_call=True).remove,
            self.adapter.projector.register_forward_hook(self._after_projector).remove,
        ]

    def _arm(self, arguments: dict[str, Any]) -> None:
        regions = self.adapter.frame_regions(arguments)  # (videos, frames, m, d)
        masks = [self._keeps(video) for video in regions]
        frames = torch.stack([mask.any(1) for mask in masks])  # (videos, frames): a region kept -> encoded
        self.armed = (frames.numel(), masks, frames)

    def _before_tower(self, module, args: tuple, kwargs: dict[str, Any]):
        if self.armed is None:
            return None  # images, or a call the stage did not arm
        n, masks, frames = self.armed
        self.armed = None
        pixels = compat.forward_arguments(module, args, kwargs)["pixel_values"]
        if pixels.shape[0] != n:
            raise RuntimeError(f"the tower got {pixels.shape[0]} images for a video call of {n} frames")
        patch = self.adapter.model.config.vision_config.patch_size
        per = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
        closing = torch.ones(self.adapter.trailing_video_tokens, dtype=torch.bool)
        self.encoding = [
            Encoded(torch.cat([mask.reshape(-1).cpu(), closing]), per * len(kept), per * int(kept.sum()))
            for mask, kept in zip(masks, frames, strict=True)
        ]
        keep = frames.reshape(-1)
        if bool(keep.all()):
            return None
        source = torch.cat([last_kept(kept[:, None]).reshape(-1) + i * len(kept) for i, kept in enumerate(frames)])
        self.rows = (keep.long().cumsum(0) - 1)[source]
        return compat.replaced_arguments(module, args, kwargs, pixel_values=pixels[keep.to(pixels.device)])

    def _after_tower(self, module, args, output) -> None:
        self._ended(output is not None)
        if output is None:  # the call raised: nothing reaches the projector
            self.rows = None

    def _after_projector(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        """Every frame given gets its rows back: the kept frames' own, the others their last kept frame's. (At the
        projector, not the tower: transformers gathers the tower's hidden states outside its forward.)"""
        rows, self.rows = self.rows, None
        return None if rows is None else output[rows.to(output.device)]


@runtime
class FramesStage(PreLLMStage):
    """Encodes only the video patch groups its `FrameFilter` keeps, and drops the others' tokens at the LLM."""

    name = "frames"

    def __init__(self, method: FrameFilter, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        if not (adapter.patch_groups or adapter.whole_frames):
            raise ValueError(
                f"{type(method).__name__} runs the vision tower on a video's changed patches only; tokred does that "
                "for towers that take patch groups (qwen2_vl, qwen2_5_vl, qwen3_vl) or whole frames "
                f"(llava_onevision), not {adapter.family}"
            )
        super().__init__(method, adapter, current)
        self.tower = RaggedTower(method, adapter) if adapter.patch_groups else FrameTower(method, adapter)

    def install(self) -> list[Callable[[], None]]:
        return self.tower.install()

    def records(self, call: Call) -> Selection | None:
        if self.name in call.given:  # a prompt recomputed without a cache: its cut is reused, its media may not
            self.tower.pending = []  # have been encoded again (generate encodes them once, ahead)
            return None
        return self.tower.take(call)

    def select(self, call: Call, records: Selection | None) -> Selection | None:
        return records
