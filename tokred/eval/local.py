"""Local datasets: a directory of images or videos with a ``questions.jsonl``, scored by `tokred eval` like the
synthetic tasks.

One JSON object a line, with ``question``, ``answer`` and the medium, ``video`` or ``image``: a path relative to
the directory (every record of a dataset takes the same medium). Optional: ``id``, ``type`` and ``choices``
(answers the model may give). The dataset's answers are the union of every record's ``answer`` and ``choices``,
and a model's answer is the longest of them its output starts with, as for the synthetic tasks. Videos are read
with `tokred.video` (decord, PyAV where decord is missing): ``frames`` evenly spread frames at their own
timestamps, each at most ``max_pixels``.

    my_clips/questions.jsonl   {"video": "clips/a.mp4", "question": "which way does it move?", "answer": "left"}
    tokred eval --model ... --tasks my_clips --frames 16
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tokred import video
from tokred.zoo.datasets import Media
from tokred.zoo.prompts import Kind

QUESTIONS = "questions.jsonl"
MEDIA_FIELDS = ("image", "video")
DEFAULT_FRAMES = 16


def is_local(task: str | os.PathLike) -> bool:
    """Whether `task` names a local dataset directory (one holding `QUESTIONS`) rather than a synthetic task."""
    return (Path(task) / QUESTIONS).is_file()


@dataclass(frozen=True)
class LocalDataset:
    """A local dataset's records (in file order) and its `Kind` (medium and answer vocabulary)."""

    root: Path
    records: tuple[dict, ...]
    kind: Kind

    @classmethod
    def open(cls, path: str | os.PathLike) -> LocalDataset:
        """Read and check ``path/questions.jsonl``; ValueError naming the line and what is missing or wrong."""
        root = Path(path)
        file = root / QUESTIONS
        if not file.is_file():
            raise FileNotFoundError(f"{root} is not a local dataset: it has no {QUESTIONS} (see tokred.eval.local)")
        records, media = [], set()
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{file}:{number}: not a JSON object ({error})") from error
            where = f"{file}:{number}"
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            given = [f for f in MEDIA_FIELDS if f in record]
            missing = [f for f in ("question", "answer") if not isinstance(record.get(f), str)]
            if missing or len(given) != 1:
                need = ", ".join(missing) or "exactly one of " + " or ".join(MEDIA_FIELDS)
                raise ValueError(f"{where}: a record needs string fields question, answer and one medium; {need} wrong")
            choices = record.get("choices", [])
            if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
                raise ValueError(f"{where}: choices must be a list of strings, got {choices!r}")
            media.add(given[0])
            records.append(record)
        if not records:
            raise ValueError(f"{file} holds no questions")
        if len(media) > 1:
            raise ValueError(f"{file} mixes images and videos; a dataset takes one medium")
        answers = sorted({r["answer"] for r in records} | {c for r in records for c in r.get("choices", [])})
        return cls(root, tuple(records), Kind(root.name, media.pop(), tuple(answers)))

    def media(self, record: dict, frames: int = DEFAULT_FRAMES, max_pixels: int | None = None) -> Media | video.Video:
        """A record's image (RGB) or its video's `frames` evenly spread frames (all of a shorter video)."""
        path = self.root / record[self.kind.medium]
        if self.kind.medium == "video":
            return video.load(path, num_frames=min(frames, video.frame_count(path)), max_pixels=max_pixels)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} (of {self.root / QUESTIONS}) does not exist")
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as error:
            raise ValueError(f"image {path} cannot be read: {error}") from error
