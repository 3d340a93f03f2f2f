"""MotionVQA: one-word questions about what changes in a short clip (16 frames of 224x224 by default).

The textured background is the same in every frame and 2-5 solid objects (unique colour+shape pairs) each play
one role: ``static``, ``mover`` (straight left/right/up/down, far enough to leave its starting box; on the
default 28 px token grid a cell at a time, between two-frame temporal patches), ``appear`` (absent until frame
``appear``) or ``disappear`` (gone from frame ``disappear`` on). So most patches repeat from frame to frame,
and the answer lives in the few that change, which is what temporal token merging and pruning must keep.

Templates (``type``): ``direction`` "which way did the <colour> <shape> move?" (left/right/up/down),
``appeared`` "which object appeared?" (the shape of the one object that appears), ``appear_time`` "in
which third of the video did the <colour> <shape> appear?" (beginning/middle/end, the appearance
frame kept a frame away from the thirds' borders), ``count_end`` "how many objects are there at the
end?" (a digit). A video holds at most one appearing object.

Each object records its ``track``: the centre [x, y] in every frame (also while invisible); it is
visible in frames ``appear <= t < disappear``. Tracks never come within ``margin`` px of each other in
any frame, visible or not, so the spot where an object appears is empty beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tokred.zoo.datasets.common import (
    COLOURS,
    MAX_OBJECTS,
    MAX_SCENES,
    SHAPES,
    BaseParams,
    Question,
    background,
    draw_shape,
    fit_cells,
    pick,
    place,
    require,
    sample_id,
)

TYPES = ("direction", "appeared", "appear_time", "count_end")
DEFAULT_TYPES = ("direction", "appeared", "appear_time")
"""Counting is left out by default: the zoo's small LLMs never learned it (they stayed at the prior)."""
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
THIRDS = ("beginning", "middle", "end")
ANSWERS = sorted({*DIRECTIONS, *SHAPES, *THIRDS, *(str(n) for n in range(MAX_OBJECTS + 1))})
_ROLE_POOL = ("static", "static", "mover", "mover", "appear", "disappear")
_REQUIRED = {"direction": ["mover"], "appeared": ["appear"], "appear_time": ["appear"], "count_end": []}


@dataclass(frozen=True)
class Params(BaseParams):
    """MotionVQA knobs; sizes and shifts in pixels."""

    size: int = 224
    frames: int = 16
    min_objects: int = 2
    max_objects: int = 5
    object_size: tuple[int, int] = (20, 44)
    shift: tuple[int, int] = (52, 112)  # a mover's displacement from the first to the last frame
    margin: int = 6
    cell: int = 28  # objects fill whole cells of this grid and move a cell at a time, every 2 frames; 0: freely
    types: tuple[str, ...] = DEFAULT_TYPES  # the templates questions are drawn from

    def check(self) -> None:
        require(12 <= self.frames <= 1000, "frames must be in [12, 1000] (each third needs inner frames)")
        require(1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS, f"need 1 <= objects <= {MAX_OBJECTS}")
        require(1 <= self.object_size[0] <= self.object_size[1] <= self.size // 4, "object_size too large")
        require(self.object_size[1] < self.shift[0] <= self.shift[1] <= self.size // 2, "need size < shift <= half")
        require(bool(self.types) and set(self.types) <= set(TYPES), f"types must be some of {TYPES}")


def sample(rng: np.random.Generator, split: str, index: int, params: Params) -> tuple[dict, list[Image.Image]]:
    """One record and its frames; the template is drawn first and the roles are chosen so that it applies."""
    qtype = pick(rng, params.types)
    for _ in range(MAX_SCENES):
        objects = scene(rng, qtype, params)
        if objects is not None:
            break
    else:
        raise RuntimeError(f"could not place the objects in {MAX_SCENES} scenes; check the parameters {params}")
    question, answer, targets = _TEMPLATES[qtype](rng, objects, params)
    frames = render(rng, objects, params)
    record = {
        "id": sample_id(split, index),
        "video": f"videos/{sample_id(split, index)}",
        "frames": params.frames,
        "question": question,
        "answer": answer,
        "type": qtype,
        "targets": targets,
        "split": split,
        "objects": objects,
    }
    return record, frames


def questions(rng: np.random.Generator, objects: list[dict], params: Params) -> list[tuple[str, Question]]:
    """Every (type, question) the clip supports; an appearance time only when it is clear of the thirds' borders."""
    appearing = [o["appear"] for o in objects if o["appear"] > 0]
    supported = {
        "direction": any(o["motion"] != "static" for o in objects),
        "appeared": bool(appearing),
        "appear_time": any(t in third_frames(3 * t // params.frames, params.frames) for t in appearing),
        "count_end": True,
    }
    return [
        (qtype, _TEMPLATES[qtype](rng, objects, params))
        for qtype, ok in supported.items()
        if ok and qtype in params.types
    ]


def scene(rng: np.random.Generator, qtype: str, params: Params) -> list[dict] | None:
    """Objects ``{shape, colour, size, motion, appear, disappear, track}`` in random order, or None when
    placement fails."""
    n = max(int(rng.integers(params.min_objects, params.max_objects + 1)), len(_REQUIRED[qtype]))
    roles = _roles(rng, qtype, n)
    pairs = rng.choice(len(COLOURS) * len(SHAPES), n, replace=False)
    objects, placed = [], np.zeros((0, params.frames, 2), np.int64)
    for role, pair in zip(roles, pairs, strict=True):
        size = fit_cells(int(rng.integers(params.object_size[0], params.object_size[1] + 1)), params.cell)
        motion = pick(rng, list(DIRECTIONS)) if role == "mover" else "static"
        radii = np.array([o["size"] / 2 for o in objects])
        offsets = _offsets(rng, motion, params)
        track = place(rng, placed, radii, offsets, size / 2, params.size, params.margin, cell=params.cell)
        if track is None:
            return None
        placed = np.concatenate([placed, track[None]])
        appear, disappear = _timing(rng, role, qtype, params.frames)
        colour, shape = list(COLOURS)[pair // len(SHAPES)], SHAPES[pair % len(SHAPES)]
        objects.append(
            {
                "shape": shape,
                "colour": colour,
                "size": size,
                "motion": motion,
                "appear": appear,
                "disappear": disappear,
                "track": track.tolist(),
            }
        )
    return [objects[i] for i in rng.permutation(n)]


def _roles(rng: np.random.Generator, qtype: str, n: int) -> list[str]:
    """The template's required role first, then random ones, with at most one appearing object."""
    roles = list(_REQUIRED[qtype])
    while len(roles) < n:
        role = pick(rng, _ROLE_POOL)
        roles.append("static" if role == "appear" and "appear" in roles else role)
    return roles


def _offsets(rng: np.random.Generator, motion: str, params: Params) -> np.ndarray:
    """Per-frame displacement (frames, 2) from the start: linear, rounded to whole pixels; on a grid, whole cells
    that change on even frames only (both frames of a two-frame temporal patch show one position)."""
    if motion == "static":
        return np.zeros((params.frames, 2), np.int64)
    distance = int(rng.integers(params.shift[0], params.shift[1] + 1))
    if params.cell:
        cells, pairs = max(1, round(distance / params.cell)), (params.frames + 1) // 2
        slots = np.rint(cells * (np.arange(params.frames) // 2) / max(1, pairs - 1)).astype(np.int64)
        return (params.cell * slots)[:, None] * np.array(DIRECTIONS[motion])
    steps = np.rint(distance * np.arange(params.frames) / (params.frames - 1)).astype(np.int64)
    return steps[:, None] * np.array(DIRECTIONS[motion])


def _timing(rng: np.random.Generator, role: str, qtype: str, frames: int) -> tuple[int, int]:
    """(appear, disappear): visible in frames appear <= t < disappear; changes happen strictly inside the clip."""
    if role == "disappear":
        return 0, int(rng.integers(2, frames))
    if role != "appear":
        return 0, frames
    if qtype == "appear_time":
        return int(pick(rng, third_frames(int(rng.integers(3)), frames))), frames
    return int(rng.integers(1, frames - 1)), frames


def third_frames(third: int, frames: int) -> range:
    """Appearance frames for a third (0, 1, 2) at least one frame clear of its borders, never the last frame."""
    low = max(1, -(-third * frames // 3) + 1)
    high = min(frames - 2, -(-(third + 1) * frames // 3) - 2)
    return range(low, high + 1)


def which_third(frame: int, frames: int) -> str:
    return THIRDS[3 * frame // frames]


def render(rng: np.random.Generator, objects: list[dict], params: Params) -> list[Image.Image]:
    """One shared background, then per frame the objects visible in it."""
    still = background(rng, params.size, params.size)
    frames = []
    for t in range(params.frames):
        frame = still.copy()
        draw = ImageDraw.Draw(frame)
        for o in objects:
            if o["appear"] <= t < o["disappear"]:
                draw_shape(draw, o["shape"], o["colour"], *o["track"][t], o["size"])
        frames.append(frame)
    return frames


def _direction(rng: np.random.Generator, objects: list[dict], params: Params) -> Question:
    i = pick(rng, [i for i, o in enumerate(objects) if o["motion"] != "static"])
    return f"which way did the {objects[i]['colour']} {objects[i]['shape']} move?", objects[i]["motion"], [i]


def _appearing(objects: list[dict]) -> int:
    (i,) = (i for i, o in enumerate(objects) if o["appear"] > 0)
    return i


def _appeared(rng: np.random.Generator, objects: list[dict], params: Params) -> Question:
    i = _appearing(objects)
    return "which object appeared?", objects[i]["shape"], [i]


def _appear_time(rng: np.random.Generator, objects: list[dict], params: Params) -> Question:
    i = _appearing(objects)
    question = f"in which third of the video did the {objects[i]['colour']} {objects[i]['shape']} appear?"
    return question, which_third(objects[i]["appear"], params.frames), [i]


def _count_end(rng: np.random.Generator, objects: list[dict], params: Params) -> Question:
    visible = [i for i, o in enumerate(objects) if o["disappear"] == params.frames]
    return "how many objects are there at the end?", str(len(visible)), visible


_TEMPLATES: dict[str, Callable[[np.random.Generator, list[dict], Params], Question]] = {
    "direction": _direction,
    "appeared": _appeared,
    "appear_time": _appear_time,
    "count_end": _count_end,
}
