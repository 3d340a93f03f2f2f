"""tokred.video: frame sampling, metadata, keyframe-parallel decoding and the loader's errors, on clips written
here with PyAV (each frame marks its own index with a bright bar, so a decoded frame says which one it is)."""

from __future__ import annotations

import av
import numpy as np
import pytest
from PIL import Image

from tokred import video
from tokred.video import load, sample_indices

FRAMES, FPS, GOP = 30, 10, 8  # a keyframe every 8 frames: 4 chunks


def write_clip(path, frames: int = FRAMES, gop: int = GOP, size: tuple[int, int] = (64, 48)) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(frames):
            pixels = np.zeros((size[1], size[0], 3), np.uint8)
            pixels[:, 2 * i : 2 * i + 2] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def marked(frame: Image.Image) -> int:
    """The index a decoded frame marks: where its bright bar is."""
    return int(np.asarray(frame.convert("L"), np.float32).mean(0).argmax()) // 2


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_clip(path)
    return path


@pytest.mark.parametrize("backend", video.BACKENDS)
def test_uniform_sampling_takes_evenly_spread_frames_with_their_metadata(clip, backend):
    got = load(clip, num_frames=7, backend=backend)
    expected = np.linspace(0, FRAMES - 1, 7).round().astype(int).tolist()
    assert [marked(f) for f in got.frames] == expected == got.metadata.frames_indices
    assert (got.metadata.total_num_frames, got.metadata.fps, got.metadata.video_backend) == (FRAMES, FPS, backend)
    assert got.timestamps == pytest.approx([i / FPS for i in expected])
    assert got.frames[0].size == (64, 48) and got.frames[0].mode == "RGB"


@pytest.mark.parametrize("backend", video.BACKENDS)
def test_fps_sampling_takes_one_frame_per_period_and_no_arguments_take_all(clip, backend):
    assert [marked(f) for f in load(clip, fps=2.5, backend=backend).frames] == [0, 4, 8, 12, 16, 20, 24, 28]
    assert [marked(f) for f in load(clip, backend=backend).frames] == list(range(FRAMES))


@pytest.mark.parametrize("backend", video.BACKENDS)
def test_parallel_decoding_in_keyframe_chunks_gives_the_sequential_frames(clip, backend):
    sequential = load(clip, num_frames=12, backend=backend)
    parallel = load(clip, num_frames=12, backend=backend, parallel=True, workers=3)
    assert parallel.metadata.frames_indices == sequential.metadata.frames_indices
    for a, b in zip(parallel.frames, sequential.frames, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_both_backends_count_the_same_keyframes(clip):
    decord, pyav = video._open(str(clip), "decord"), video._open(str(clip), "pyav")
    assert decord.keyframes() == pyav.keyframes() == list(range(0, FRAMES, GOP))
    indices = [0, 3, 7, 8, 20, 29]
    assert video._chunks(indices, decord.keyframes(), 6) == [[0, 3, 7], [8], [20], [29]]  # cut at keyframes only
    assert video._chunks(indices, decord.keyframes(), 2) == [[0, 3, 7], [8, 20, 29]]  # then joined into runs


def test_max_pixels_shrinks_each_frame_keeping_its_aspect(clip):
    frame = load(clip, num_frames=1, max_pixels=64 * 48 // 4).frames[0]
    assert frame.size == (32, 24)


def test_sampling_refuses_what_the_video_cannot_give():
    assert sample_indices(5, 10.0) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="asked for 6 frames; the video has 5"):
        sample_indices(5, 10.0, num_frames=6)
    with pytest.raises(ValueError, match="num_frames must be a positive whole number, got 0"):
        sample_indices(5, 10.0, num_frames=0)
    with pytest.raises(ValueError, match="fps must be positive, got -1"):
        sample_indices(5, 10.0, rate=-1)
    with pytest.raises(ValueError, match="give num_frames or fps, not both"):
        sample_indices(5, 10.0, num_frames=2, rate=1.0)
    with pytest.raises(ValueError, match="records no frame rate"):
        sample_indices(5, 0.0, rate=1.0)


@pytest.mark.parametrize("backend", video.BACKENDS)
def test_missing_corrupt_and_empty_files_are_refused_clearly(tmp_path, backend):
    with pytest.raises(FileNotFoundError, match="no video file at"):
        load(tmp_path / "nothing.mp4", backend=backend)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="corrupt.mp4 is not a readable video"):
        load(corrupt, backend=backend)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4 (is not a readable video|holds no frames)"):
        load(empty, backend=backend)
    with pytest.raises(ValueError, match="unknown video backend 'cv2'"):
        load(corrupt, backend="cv2")


def test_qwen_processor_takes_the_loaded_metadata_for_its_time_steps(clip, zoo_root):
    """Qwen2.5-VL's M-RoPE time step per temporal patch is temporal_patch_size / the sampled fps."""
    from transformers import AutoProcessor

    from tokred.zoo import build

    processor = AutoProcessor.from_pretrained(build("qwen2_5_vl", zoo_root / "qwen2_5_vl"))
    got = load(clip, num_frames=8)
    content = [{"type": "video"}, {"type": "text", "text": "which way did it move?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(
        text=[text], videos=[got.frames], video_metadata=[got.metadata], do_sample_frames=False, return_tensors="pt"
    )
    sampled_fps = 8 / FRAMES * FPS  # 8 frames over the clip's 3 s
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([2 / sampled_fps])
    assert processor.video_processor.temporal_patch_size == 2 and inputs["video_grid_thw"][0, 0].item() == 4
