"""`per_frame=True`: a video's budget spread evenly over its temporal slots, none left empty unless it repeats
an earlier one; on plain tensors, then through the pre_llm and llm stages on every family that takes video."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokred
from tokred.methods import METHODS
from tokred.methods.base import frame_budgets
from tokred.tokens import Span, VisionTokens

VIDEO_REDUCERS = ("random", "dycoke", "vidcom2", "divprune", "fastv")
"""Selecting reducers a video can take per frame (fastvid and tome merge by their own rule across the span)."""


def video(frames: torch.Tensor) -> VisionTokens:
    t, per, d = frames.shape
    return VisionTokens(Span("video", torch.arange(t * per), grid=(t, 2, per // 2)), frames.reshape(t * per, d))


def test_the_budget_is_even_over_distinct_slots_earlier_ones_first():
    frames = torch.randn(4, 4, 8)
    assert frame_budgets(video(frames), 6) == [2, 2, 1, 1]
    assert frame_budgets(video(frames), 2) == [1, 1, 0, 0]
    frames[2] = frames[0]  # slot 2 repeats slot 0: it gets nothing while the others have room
    assert frame_budgets(video(frames), 6) == [2, 2, 0, 2]
    assert frame_budgets(video(frames), 14) == [4, 4, 2, 4]


def test_images_have_no_slots_and_a_video_without_its_grid_is_refused():
    tokens = VisionTokens(Span("image", torch.arange(16), grid=(1, 4, 4)), torch.randn(16, 8))
    assert frame_budgets(tokens, 4) is None
    for grid in (None, (2, 2, 2)):
        with pytest.raises(ValueError, match=r"per_frame needs each video's \(t, h, w\) token grid; .* 16 tokens"):
            frame_budgets(dataclasses.replace(tokens, span=Span("video", torch.arange(16), grid=grid)), 4)


def test_random_per_frame_keeps_every_distinct_slot():
    frames = torch.randn(5, 4, 8)
    frames[3] = frames[1]
    tokens = video(frames)
    kept = tokred.Random(keep=0.25, per_frame=True).pick(tokens, 5, torch.Generator().manual_seed(0))
    assert torch.bincount(kept // 4, minlength=5).tolist() == [2, 1, 1, 0, 1]


def test_a_merger_refuses_per_frame():
    with pytest.raises(ValueError, match="merges by its own rule across the span; per_frame is not a setting"):
        tokred.ToMe(keep=0.5, per_frame=True)


@pytest.mark.parametrize("name", VIDEO_REDUCERS)
def test_each_slot_keeps_its_share_through_the_stages(tiny_video, name):
    method = dataclasses.replace(METHODS[name].example(), per_frame=True)
    inputs = tiny_video.video()
    with tokred.patched(tiny_video.model, method):
        if tiny_video.family == "llava_onevision":
            with pytest.raises(ValueError, match="per_frame needs each video's"):
                tiny_video.model(**inputs)
            pytest.skip("LLaVA-OneVision gives no temporal grid for its pooled video tokens (refused)")
        tiny_video.model(**inputs)
        stats = tokred.stats(tiny_video.model)
    (grid,) = [g for kind, g in stats.media[0] if kind == "video"]
    positions = (inputs["input_ids"][0] == tiny_video.model.config.video_token_id).nonzero()[:, 0]
    slot = {int(p): i // (grid[1] * grid[2]) for i, p in enumerate(positions)}
    kept = stats.kept_positions[method.stage][0]
    per_slot = torch.bincount(torch.tensor([slot[int(p)] for p in kept]), minlength=grid[0]).tolist()
    k = method.budget(len(positions))
    assert per_slot == [k // grid[0] + (s < k % grid[0]) for s in range(grid[0])]
