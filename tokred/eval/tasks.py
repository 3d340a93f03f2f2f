"""Local evaluation tasks: tokred's synthetic benchmarks, written once to disk and read back from files, and local
datasets of the user's own images or videos (`tokred.eval.local`: a directory path stands for its dataset).

The runner and the lmms-eval plugin read the same jsonl and PNG files, so both score the same questions.
Files live under ``$TOKRED_CACHE/data/seed<seed>/<task>/`` (default root ``~/.cache/tokred``) and are
generated on first use; generation is bit-identical, and a request for more questions than are on disk (or
files of an older format) regenerates the split (earlier records of the same format never change).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokred.adapters import adapter_class
from tokred.eval.local import DEFAULT_FRAMES, LocalDataset, is_local
from tokred.video import Video
from tokred.zoo import datasets
from tokred.zoo.builders import cache_root
from tokred.zoo.prompts import MEDIA, Kind, kind_of

LOCAL_TASKS: tuple[str, ...] = tuple(datasets.KINDS)
"""Tasks that run offline from tokred's own data: ``("shapes", "motion")``."""

DEFAULT_QUESTIONS = 200


@dataclass(frozen=True)
class Question:
    """One test question: its record (question, answer, type, ...) and its image or frames."""

    record: dict
    media: datasets.Media | Video

    @property
    def answer(self) -> str:
        return self.record["answer"]


def data_root(seed: int = 0) -> Path:
    return cache_root() / "data" / f"seed{seed}"


def ensure(task: str, n: int = DEFAULT_QUESTIONS, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """The directory of ``task``'s files with at least ``n`` test questions, generating them if needed."""
    check(task)
    root = Path(root) if root is not None else data_root(seed)
    meta = root / task / "meta.json"
    try:
        written = json.loads(meta.read_text())
        have = written["counts"]["test"] if written["format_version"] == datasets.FORMAT_VERSION else -1
    except (OSError, ValueError, KeyError):
        have = -1
    if have < n:
        datasets.generate(task, root, n_train=0, n_test=n, seed=seed)
    return root / task


def questions(
    task: str,
    limit: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    *,
    frames: int = DEFAULT_FRAMES,
    max_pixels: int | None = None,
) -> list[Question]:
    """The first ``limit`` (default 200) test questions of a local task, read from its files; for a local dataset
    (a directory path) its first ``limit`` records (default all), videos sampled to ``frames`` frames."""
    n = DEFAULT_QUESTIONS if limit is None else limit
    if n < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if is_local(task):
        if frames < 1:
            raise ValueError(f"frames must be >= 1 (frames sampled from each video), got {frames}")
        data = LocalDataset.open(task)
        return [Question(r, data.media(r, frames, max_pixels)) for r in data.records[: limit or len(data.records)]]
    directory = ensure(task, n, seed, root)
    records = datasets.load(task, directory.parent, "test")[:n]
    return [Question(r, datasets.open_media(task, directory.parent, r)) for r in records]


def kind(task: str) -> Kind:
    """What prompts and scoring need of a task (a synthetic task's name or a local dataset's directory)."""
    return LocalDataset.open(task).kind if is_local(task) else kind_of(task)


def takes(family: str) -> tuple[str, ...]:
    """The local tasks a checkpoint of this model_type can run: video tasks only where the family takes video."""
    video = adapter_class(family).takes_video
    return tuple(task for task in LOCAL_TASKS if video or MEDIA[task] != "video")


def check(task: str, family: str | None = None) -> str:
    """``task`` if it is a local task or a local dataset's directory (that a ``family`` checkpoint can run, when
    given), else a ValueError."""
    if is_local(task):
        medium = LocalDataset.open(task).kind.medium
        if family is not None and medium == "video" and not adapter_class(family).takes_video:
            raise ValueError(f"local dataset {task!r} asks about videos, which {family} checkpoints do not take")
        return task
    if task not in LOCAL_TASKS:
        raise ValueError(
            f"unknown local task {task!r}; local tasks are: {', '.join(LOCAL_TASKS)}, or a directory holding a "
            "questions.jsonl (tokred.eval.local); standard benchmarks such as mme or videomme run with "
            "--backend lmms-eval"
        )
    if family is not None and task not in takes(family):
        raise ValueError(
            f"task {task!r} asks about {MEDIA[task]}s, which {family} checkpoints do not take; "
            f"tasks a {family} checkpoint can run: {', '.join(takes(family))}"
        )
    return task
