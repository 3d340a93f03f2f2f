"""The frames stage on LLaVA-OneVision: SigLIP encodes a video's frames as whole images, so temporal_dedup leaves
out the frames in which no token's region changed, and the LLM gets only the tokens whose region did (each
frame's 2x2-pooled tokens; the tiny model's 56 px frames make four, 28 px a side, then one newline a video)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import _tiny
from PIL import Image
from test_frames import RECIPES, check_batched_equals_alone_and_uncached, llm_inputs, video_inputs
from test_frames import clip as frames_clip

import tokred
import tokred.adapters
from tokred import TemporalDedup

TOKENS = 4  # per frame: 2x2 pooled tokens


@pytest.fixture(scope="module")
def onevision(zoo_root):
    return _tiny("llava_onevision", zoo_root)


def clip(frames: int, changed: dict[int, tuple[slice, slice]], seed: int = 0) -> list[Image.Image]:
    """`test_frames.clip` at the tiny model's 56 px frames."""
    return frames_clip(frames, changed, seed, size=56)


def video_positions(tiny, inputs: dict, b: int = 0) -> torch.Tensor:
    return (inputs["input_ids"][b] == tiny.model.config.video_token_id).nonzero()[:, 0]


def test_a_static_video_reaches_the_tower_as_one_frame(onevision):
    inputs = video_inputs(onevision, [clip(20, {})])
    with tokred.patched(onevision.model, TemporalDedup()):
        onevision.model(**inputs)
        stats = tokred.stats(onevision.model)
    patches = 16  # 4x4 SigLIP patches a frame
    assert stats.encoder_patches == {"input": [20 * patches], "frames": [patches]}  # 95 % fewer
    assert stats.vision_tokens == {"input": [20 * TOKENS + 1], "frames": [TOKENS + 1]}


def test_a_changed_region_is_kept_in_every_frame_where_it_changed(onevision):
    """The top-left region changes at frame 3, the top-right at frame 5: frames 0, 3 and 5 are encoded, and the
    LLM keeps frame 0 whole, each changed token in its frame, and the newline."""
    inputs = video_inputs(onevision, [clip(8, {3: (slice(0, 28), slice(0, 28)), 5: (slice(0, 28), slice(28, 56))})])
    with tokred.patched(onevision.model, TemporalDedup()):
        onevision.model(**inputs)
        stats = tokred.stats(onevision.model)
    video = video_positions(onevision, inputs)
    assert stats.kept_positions["frames"][0].tolist() == video[[0, 1, 2, 3, 3 * 4 + 0, 5 * 4 + 1, 32]].tolist()
    assert stats.encoder_patches == {"input": [8 * 16], "frames": [3 * 16]}


def test_kept_tokens_are_the_stock_models_tokens(onevision):
    """Whole frames are encoded alone, so every kept token's input row equals the stock model's."""
    inputs = video_inputs(onevision, [clip(8, {2: (slice(28, 56), slice(0, 56)), 6: (slice(0, 56), slice(0, 28))})])
    stock = llm_inputs(onevision.model, inputs)
    with tokred.patched(onevision.model, TemporalDedup()):
        ours = llm_inputs(onevision.model, inputs)
        kept = tokred.stats(onevision.model).kept_positions["frames"][0]
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[video_positions(onevision, inputs)] = False
    keep[kept] = True
    assert len(kept) == TOKENS + 2 + 2 + 1
    torch.testing.assert_close(ours["inputs_embeds"][0], stock["inputs_embeds"][0, keep], rtol=0, atol=0)


def test_a_video_where_everything_changes_runs_as_stock(onevision):
    rng = np.random.default_rng(1)
    videos = [[Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)) for _ in range(6)]]
    inputs = video_inputs(onevision, videos)
    stock = onevision.model(**inputs).logits
    with tokred.patched(onevision.model, TemporalDedup(threshold=1e-6)):
        assert torch.equal(onevision.model(**inputs).logits, stock)
        stats = tokred.stats(onevision.model)
    assert stats.encoder_patches["frames"] == stats.encoder_patches["input"] == [6 * 16]


@pytest.mark.parametrize("recipe", RECIPES)
def test_generate_batched_equals_alone_and_uncached(onevision, recipe):
    videos = [clip(8, {4: (slice(0, 28), slice(0, 56))}), clip(8, {2: (slice(28, 56), slice(0, 28))}, seed=1)]
    check_batched_equals_alone_and_uncached(onevision, recipe, videos)


def test_images_pass_untouched_and_a_failing_tower_leaves_nothing_behind(onevision):
    image = onevision.image()
    stock = onevision.model(**image).logits
    layer = tokred.adapters.adapter_for(onevision.model).vision_blocks[-1]

    def fail(module, args, kwargs):
        raise RuntimeError("a failing layer")

    with tokred.patched(onevision.model, TemporalDedup()):
        assert torch.equal(onevision.model(**image).logits, stock)
        handle = layer.register_forward_pre_hook(fail, with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match="a failing layer"):
                onevision.model(**video_inputs(onevision, [clip(8, {})]))
        finally:
            handle.remove()
        assert torch.equal(onevision.model(**image).logits, stock)
        assert tokred.stats(onevision.model).encoder_patches == {}
