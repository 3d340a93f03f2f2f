"""Video input: frames sampled from a file with decord (PyAV where decord is missing), with the metadata the
processors take (Qwen2.5-VL's M-RoPE time steps come from its sampled fps, Qwen3-VL's prompt from timestamps).

    video = tokred.video.load("clip.mp4", num_frames=16)
    processor(text=..., videos=[video.frames], video_metadata=[video.metadata], do_sample_frames=False)

With ``parallel=True`` the wanted frames are split at the video's keyframes into one run per worker, each
decoded independently (from its own keyframe, as a seek would) by its own reader in a thread pool, like
QuickVideo's decoder; the frames are the same as one sequential reader's (`benchmarks/video_decode.py`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.video_utils import VideoMetadata

BACKENDS = ("decord", "pyav")


@dataclass(frozen=True)
class Video:
    """Sampled frames (RGB) and their metadata (source fps and frame count, sampled indices)."""

    frames: list[Image.Image]
    metadata: VideoMetadata

    @property
    def timestamps(self) -> list[float]:
        """Seconds from the start of each sampled frame."""
        return self.metadata.timestamps


class _Decord:
    """One open video through decord: its length, fps, size, keyframes and a batch decode."""

    backend = "decord"

    def __init__(self, path: str) -> None:
        import decord

        self.reader = decord.VideoReader(path, num_threads=1)
        self.fps = float(self.reader.get_avg_fps())
        height, width = self.reader[0].shape[:2] if len(self.reader) else (0, 0)
        self.size = (int(width), int(height))

    def __len__(self) -> int:
        return len(self.reader)

    def keyframes(self) -> list[int]:
        return [int(i) for i in self.reader.get_key_indices()]

    def decode(self, indices: Sequence[int]) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 frames, `indices` ascending."""
        return self.reader.get_batch(list(indices)).asnumpy()


class _PyAV:
    """The same through PyAV: frames are counted from the packets' presentation times, without decoding."""

    backend = "pyav"

    def __init__(self, path: str) -> None:
        import av

        self.path = path
        with av.open(path) as container:
            stream = container.streams.video[0]
            self.fps = float(stream.average_rate or stream.guessed_rate or 0)
            self.size = (stream.codec_context.width, stream.codec_context.height)
            packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size and p.pts is not None]
        self.pts = sorted(pts for pts, _ in packets)
        self.rank = {pts: i for i, pts in enumerate(self.pts)}
        self.key = sorted(self.rank[pts] for pts, key in packets if key)

    def __len__(self) -> int:
        return len(self.pts)

    def keyframes(self) -> list[int]:
        return list(self.key)

    def decode(self, indices: Sequence[int]) -> np.ndarray:
        import av

        wanted, out = set(indices), {}
        start = max((k for k in self.key if k <= min(indices)), default=0)
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            container.seek(self.pts[start], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                index = self.rank.get(frame.pts)
                if index in wanted:
                    out[index] = frame.to_ndarray(format="rgb24")
                if len(out) == len(wanted) or (index is not None and index > max(indices)):
                    break
        if len(out) != len(wanted):
            raise ValueError(f"{self.path}: frames {sorted(wanted - set(out))} could not be decoded")
        return np.stack([out[i] for i in indices])


def _open(path: str, backend: str | None) -> _Decord | _PyAV:
    if backend is None:
        try:
            import decord  # noqa: F401
        except ImportError:
            backend = "pyav"
        else:
            backend = "decord"
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; choose one of {BACKENDS}")
    reader = _Decord if backend == "decord" else _PyAV
    try:
        return reader(path)
    except Exception as error:  # the libraries raise their own types for unreadable files
        raise ValueError(f"{path} is not a readable video ({type(error).__name__}: {error})") from error


def sample_indices(total: int, fps: float, num_frames: int | None = None, rate: float | None = None) -> list[int]:
    """The frames to take from a `total`-frame video at `fps`: `num_frames` spread evenly from the first frame
    to the last, or one every 1/`rate` seconds from the first; every frame when neither is given."""
    if num_frames is not None and rate is not None:
        raise ValueError("give num_frames or fps, not both")
    if num_frames is not None:
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive whole number, got {num_frames!r}")
        if num_frames > total:
            raise ValueError(f"asked for {num_frames} frames; the video has {total}")
        return np.linspace(0, total - 1, num_frames).round().astype(int).tolist()
    if rate is not None:
        if not rate > 0:
            raise ValueError(f"fps must be positive, got {rate!r}")
        if not fps > 0:
            raise ValueError("the video records no frame rate, so it cannot be sampled by fps; give num_frames")
        step = fps / rate
        return sorted({min(total - 1, int(i * step)) for i in range(max(1, math.floor((total - 1) / step) + 1))})
    return list(range(total))


def _chunks(indices: list[int], keyframes: list[int], parts: int) -> list[list[int]]:
    """`indices` in at most `parts` runs of about equal length, each cut where a keyframe falls between two
    indices (so each decodes from its own keyframe, never re-decoding frames another run decodes)."""
    keys = sorted(set(keyframes))
    pieces: list[list[int]] = []
    for index in indices:
        if pieces and not any(pieces[-1][-1] < k <= index for k in keys):
            pieces[-1].append(index)
        else:
            pieces.append([index])
    runs: list[list[int]] = []
    share = len(indices) / max(1, parts)
    for piece in pieces:
        if runs and len(runs) >= parts or (runs and len(runs[-1]) + len(piece) / 2 <= share):
            runs[-1] += piece
        else:
            runs.append(list(piece))
    return runs


def _resized(frame: np.ndarray, max_pixels: int | None) -> Image.Image:
    image = Image.fromarray(frame).convert("RGB")
    if max_pixels is None or image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    return image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.BICUBIC)


def _checked(path: str | os.PathLike, backend: str | None) -> _Decord | _PyAV:
    """The open video at `path`, refused clearly when it is missing, unreadable or empty."""
    path = os.fspath(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no video file at {path}")
    reader = _open(path, backend)
    if len(reader) == 0:
        raise ValueError(f"{path} holds no frames")
    return reader


def frame_count(path: str | os.PathLike, backend: str | None = None) -> int:
    """How many frames the video at `path` has (same errors as `load`)."""
    return len(_checked(path, backend))


def load(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    max_pixels: int | None = None,
    *,
    parallel: bool = False,
    workers: int | None = None,
    backend: str | None = None,
) -> Video:
    """Frames of the video at `path`: `num_frames` evenly spread, or `fps` per second, or all of them; each
    resized (aspect kept) to at most `max_pixels` pixels. `parallel` decodes keyframe-split chunks in
    `workers` threads (default: the CPU count). `backend` is "decord" or "pyav" (default: decord if
    installed). Raises FileNotFoundError for a missing file and ValueError for an unreadable or empty video
    or a sampling it cannot give."""
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")
    path = os.fspath(path)
    reader = _checked(path, backend)
    total = len(reader)
    indices = sample_indices(total, reader.fps, num_frames, fps)
    if parallel:
        workers = workers or os.cpu_count() or 1
        chunks = _chunks(indices, reader.keyframes(), workers)
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda chunk: _open(path, reader.backend).decode(chunk), chunks))
        frames = np.concatenate(parts)
    else:
        frames = reader.decode(indices)
    width, height = reader.size
    metadata = VideoMetadata(
        total_num_frames=total,
        fps=reader.fps or None,
        width=width,
        height=height,
        duration=total / reader.fps if reader.fps else None,
        video_backend=reader.backend,
        frames_indices=indices,
    )
    return Video([_resized(frame, max_pixels) for frame in frames], metadata)
