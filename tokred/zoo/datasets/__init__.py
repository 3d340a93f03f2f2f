"""Deterministic synthetic VQA benchmarks where which vision tokens survive pruning decides the answer.

Two kinds, both with one-word answers and solid saturated shapes over a muted textured background:

* ``"shapes"`` (ShapesVQA, :mod:`.shapes`): 224x224 images with 3-6 shapes; a fixed share of the
  questions is about the one tiny (16-22 px) object in each scene (``about_smallest``).
* ``"motion"`` (MotionVQA, :mod:`.motion`): 16-frame 224x224 clips over a static background where a
  few objects move, appear or disappear.

:mod:`.cells` says which LLM token cells each object paints (ground truth for training aids and for
`tokred eval`'s target recall).

Use :func:`sample` in memory (e.g. inside a training loop) or :func:`generate` to write
``root/<kind>/{train,test}.jsonl`` plus ``images/`` or ``videos/<id>/frame_000.png`` ... and
``meta.json``; :func:`load` and :func:`open_media` read them back. Sample ``i`` of a split depends only
on ``(seed, kind, split, i)`` and the parameters, and regenerating gives bit-identical files.
``ANSWERS[kind]`` is the sorted answer vocabulary for evaluation.

    from tokred.zoo import datasets
    path = datasets.generate("shapes", "data", n_train=1000, n_test=200)
    records = datasets.load("shapes", "data", "test")
    image = datasets.open_media("shapes", "data", records[0])
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from tokred.zoo.datasets import common, motion, shapes
from tokred.zoo.datasets.common import COLOURS, FORMAT_VERSION, SHAPES, SPLITS, Media

KINDS: dict[str, ModuleType] = {"shapes": shapes, "motion": motion}
ANSWERS: dict[str, list[str]] = {kind: module.ANSWERS for kind, module in KINDS.items()}

__all__ = [
    "ANSWERS",
    "COLOURS",
    "FORMAT_VERSION",
    "KINDS",
    "SHAPES",
    "SPLITS",
    "generate",
    "load",
    "open_media",
    "questions",
    "sample",
]


def sample(kind: str, split: str, index: int, seed: int = 0, **params: Any) -> tuple[dict, Media]:
    """Record ``index`` of ``split`` and its image (shapes) or list of frames (motion), without touching disk."""
    module = _module(kind)
    return module.sample(common.sample_rng(kind, split, index, seed), split, index, _params(module, params))


def questions(kind: str, record: dict, rng: np.random.Generator, **params: Any) -> list[dict]:
    """Every question the record's scene supports, as ``{type, question, answer, targets}`` (for training
    on several questions per image or clip; which yes/no and count variants come out depends on ``rng``)."""
    module = _module(kind)
    found = module.questions(rng, record["objects"], _params(module, params))
    return [
        {"type": qtype, "question": question, "answer": answer, "targets": targets}
        for qtype, (question, answer, targets) in found
    ]


def generate(kind: str, root: str | os.PathLike, *, n_train: int, n_test: int, seed: int = 0, **params: Any) -> Path:
    """Write ``root/<kind>/`` (jsonl per split, PNGs, meta.json) and return that directory.

    The files are built in a fresh ``root/.<kind>.*.partial`` directory (so concurrent generators never share
    one) and moved into place at the end, replacing an earlier
    generation; a non-empty ``root/<kind>`` without a meta.json is never touched (FileExistsError).
    """
    module = _module(kind)
    config = _params(module, params)
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    target = Path(root) / kind
    common.check_replaceable(target)
    Path(root).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}.", suffix=".partial", dir=root))
    try:
        for split, count in zip(SPLITS, (n_train, n_test), strict=True):
            _write_split(staging, kind, module, split, count, seed, config)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "seed": seed,
            "counts": dict(zip(SPLITS, (n_train, n_test), strict=True)),
            "params": config.as_dict(),
            "answers": module.ANSWERS,
        }
        common.write_json(staging / "meta.json", meta)
        common.replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load(kind: str, root: str | os.PathLike, split: str) -> list[dict]:
    """The records of one generated split (``root/<kind>/<split>.jsonl``)."""
    _module(kind)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(root) / kind / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"no {kind} {split} split at {path}; generate it first with "
            f"tokred.zoo.datasets.generate({kind!r}, {str(root)!r}, n_train=..., n_test=...)"
        )
    return common.read_jsonl(path)


def open_media(kind: str, root: str | os.PathLike, record: dict) -> Media:
    """The image (shapes) or list of frames (motion) of a loaded record, as RGB PIL images."""
    _module(kind)
    return common.open_media(Path(root) / kind, record)


def _write_split(
    directory: Path, kind: str, module: ModuleType, split: str, count: int, seed: int, config: Any
) -> None:
    records = []
    for index in range(count):
        record, media = module.sample(common.sample_rng(kind, split, index, seed), split, index, config)
        common.save_media(directory, record, media)
        records.append(record)
    common.write_jsonl(directory / f"{split}.jsonl", records)


def _module(kind: str) -> ModuleType:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(KINDS)}")
    return KINDS[kind]


def _params(module: ModuleType, params: dict[str, Any]) -> Any:
    return common.make_params(module.Params, params)
