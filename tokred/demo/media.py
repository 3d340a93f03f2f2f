"""What the demo answers about: a bundled synthetic example or an uploaded image or video, read with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from tokred import video
from tokred.zoo import datasets
from tokred.zoo.datasets import Media

FRAMES = 16
"""Frames sampled evenly from an uploaded video (MotionVQA clips have 16)."""

EXAMPLES: dict[str, tuple[str, int]] = {f"{kind} #{i}": (kind, i) for kind in ("shapes", "motion") for i in range(3)}
"""Bundled examples by name: (synthetic task, index in its test split)."""


def medium(media: Media) -> str:
    """The medium of what `example` or `read` gave: "video" for a list of frames, else "image"."""
    return "video" if isinstance(media, list) else "image"


def example(name: str) -> tuple[Media, dict]:
    """The image (ShapesVQA) or frames (MotionVQA) of a bundled example, and its record (question, answer)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; examples are: {', '.join(EXAMPLES)}")
    kind, index = EXAMPLES[name]
    record, media = datasets.sample(kind, "test", index)
    return media, record


def read(path: str | os.PathLike) -> Media:
    """An uploaded file as an RGB image, else as FRAMES evenly spaced RGB frames of a video; ValueError if neither."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        image_error = error
    try:
        return _frames(path)
    except (OSError, ValueError, RuntimeError, ImportError) as error:
        raise ValueError(
            f"could not read {Path(path).name!r}: not an image ({type(image_error).__name__}) and not a video ({error})"
        ) from error


def _frames(path: str | os.PathLike) -> list[Image.Image]:
    """Up to FRAMES frames, evenly spaced over the whole video (`tokred.video`)."""
    return video.load(path, num_frames=min(FRAMES, video.frame_count(path))).frames
