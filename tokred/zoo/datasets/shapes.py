"""ShapesVQA: one-word questions about 3-6 solid shapes on a cluttered canvas (224x224 by default: 8x8 tokens).

Every scene has exactly one tiny object (16-22 px, in the middle of one 28 px token cell) and all others fill
2-3 whole cells less a 4 px border (52-80 px). Placing objects on the token grid (``cell``; 0 places them
anywhere) is what lets a from-scratch ViT learn shapes within a CPU hour: placed anywhere, a shape shows in too
many grid phases, and a tower probe stayed at chance for an hour. A fixed share of the questions
(``smallest_share``) asks about that tiny object, so a pruning method that drops its one or two vision tokens
gets exactly those wrong. The other questions never depend on it: their answers stay the same with the
smallest object removed (counts skip its colour, targets are other objects), which keeps the two groups
cleanly separable in evaluation.

Templates (``type``): ``colour`` "what colour is the <shape>?" (shape unique in the scene), ``shape``
"what shape is the <colour> object?" (colour unique), ``count`` "how many <colour> objects are
there?" ("0".."8"), ``exists`` "is there a <colour> <shape>?" (yes/no, balanced, hard negatives share
a colour or shape with the scene), ``quadrant`` "which quadrant holds the <shape>?" (shape unique,
centre at least ``midline_margin`` px off both midlines). Questions about the smallest object use
the colour, shape and quadrant templates. ``types`` picks the templates; counting is left out by default.
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
    is_about_smallest,
    pick,
    place,
    require,
    sample_id,
    skewed_int,
    unique_in,
)

TYPES = ("colour", "shape", "count", "exists", "quadrant")
SMALLEST_TYPES = ("colour", "shape", "quadrant")
DEFAULT_TYPES = ("colour", "shape", "exists", "quadrant")
"""Counting is left out by default: the zoo's small LLMs never learned it (they stayed at the prior)."""
QUADRANTS = ("topleft", "topright", "bottomleft", "bottomright")
ANSWERS = sorted({*COLOURS, *SHAPES, *QUADRANTS, "yes", "no", *(str(n) for n in range(MAX_OBJECTS + 1))})


@dataclass(frozen=True)
class Params(BaseParams):
    """ShapesVQA knobs; sizes are box sides in pixels."""

    size: int = 224
    min_objects: int = 3
    max_objects: int = 6
    small_size: tuple[int, int] = (16, 22)  # the one smallest object
    object_size: tuple[int, int] = (36, 70)  # all the others
    types: tuple[str, ...] = DEFAULT_TYPES  # the templates questions are drawn from
    cell: int = 28  # objects fill whole cells of this grid (the ViT token grid); 0: anywhere
    smallest_share: float = 0.3
    zero_share: float = 0.15  # count questions about an absent colour
    midline_margin: int = 24
    margin: int = 8  # minimum gap between object boxes

    def check(self) -> None:
        require(2 <= self.min_objects <= self.max_objects <= MAX_OBJECTS, f"need 2 <= objects <= {MAX_OBJECTS}")
        require(1 <= self.small_size[0] <= self.small_size[1] < self.object_size[0], "small_size < object_size")
        require(self.object_size[0] <= self.object_size[1] <= self.size // 3, "object_size too large for the canvas")
        require(0.0 <= self.smallest_share <= 1.0 and 0.0 <= self.zero_share <= 1.0, "shares must be in [0, 1]")
        require(bool(self.types) and set(self.types) <= set(TYPES), f"types must be some of {TYPES}")
        require(
            self.smallest_share == 0 or bool(set(self.types) & set(SMALLEST_TYPES)),
            f"questions about the smallest object need one of {SMALLEST_TYPES} among the types",
        )


def sample(rng: np.random.Generator, split: str, index: int, params: Params) -> tuple[dict, Image.Image]:
    """One record and its image. The template is drawn first and scenes are redrawn until it applies,
    so template frequencies don't depend on how often a template is applicable."""
    about_smallest = is_about_smallest(index, params.smallest_share)
    qtype = pick(rng, [t for t in params.types if t in SMALLEST_TYPES or not about_smallest])
    for _ in range(MAX_SCENES):
        objects = scene(rng, params)
        candidates = _TEMPLATES[qtype](rng, objects, about_smallest, params) if objects else []
        if candidates:
            break
    else:
        raise RuntimeError(f"no {qtype!r} question fits {MAX_SCENES} scenes; check the parameters {params}")
    question, answer, targets = pick(rng, candidates)
    image = render(rng, objects, params)
    record = {
        "id": sample_id(split, index),
        "image": f"images/{sample_id(split, index)}.png",
        "question": question,
        "answer": answer,
        "type": qtype,
        "about_smallest": about_smallest,
        "targets": targets,
        "split": split,
        "objects": objects,
    }
    return record, image


def questions(rng: np.random.Generator, objects: list[dict], params: Params) -> list[tuple[str, Question]]:
    """Every (type, question) the scene supports, about the smallest object and about the others."""
    return [
        (qtype, question)
        for qtype, template in _TEMPLATES.items()
        if qtype in params.types
        for about_smallest in ((False, True) if qtype in SMALLEST_TYPES else (False,))
        for question in template(rng, objects, about_smallest, params)
    ]


def scene(rng: np.random.Generator, params: Params) -> list[dict] | None:
    """Objects ``{shape, colour, cx, cy, size}`` in random order, or None when placement fails. Colours come
    from a random subset of the palette so that repeated colours (and counts above 1) are common."""
    n = int(rng.integers(params.min_objects, params.max_objects + 1))
    sizes = [int(rng.integers(params.small_size[0], params.small_size[1] + 1))]
    sizes += sorted((fit_cells(skewed_int(rng, *params.object_size), params.cell) for _ in range(n - 1)), reverse=True)
    palette = rng.choice(len(COLOURS), int(rng.integers(2, len(COLOURS) + 1)), replace=False)
    colours, still = list(COLOURS), np.zeros((1, 2), np.int64)
    objects, placed = [], np.zeros((0, 1, 2), np.int64)
    for size in sizes[1:] + sizes[:1]:  # largest first, the tiny one last
        radii = np.array([o["size"] / 2 for o in objects])
        track = place(rng, placed, radii, still, size / 2, params.size, params.margin, cell=params.cell)
        if track is None:
            return None
        placed = np.concatenate([placed, track[None]])
        colour, shape = colours[int(pick(rng, palette))], pick(rng, SHAPES)
        objects.append({"shape": shape, "colour": colour, "cx": int(track[0, 0]), "cy": int(track[0, 1]), "size": size})
    return [objects[i] for i in rng.permutation(n)]


def render(rng: np.random.Generator, objects: list[dict], params: Params) -> Image.Image:
    image = background(rng, params.size, params.size)
    draw = ImageDraw.Draw(image)
    for o in objects:
        draw_shape(draw, o["shape"], o["colour"], o["cx"], o["cy"], o["size"])
    return image


def smallest(objects: list[dict]) -> int:
    return min(range(len(objects)), key=lambda i: objects[i]["size"])


def quadrant(cx: float, cy: float, size: int) -> str:
    """``topleft`` ... ``bottomright`` of a point on a ``size``-pixel canvas (y grows downwards)."""
    return ("top" if cy < size / 2 else "bottom") + ("left" if cx < size / 2 else "right")


def _subjects(objects: list[dict], about_smallest: bool) -> list[int]:
    """The objects a colour/shape/quadrant question may be about: the smallest one, or any other."""
    tiny = smallest(objects)
    return [tiny] if about_smallest else [i for i in range(len(objects)) if i != tiny]


def _colour(rng: np.random.Generator, objects: list[dict], about_smallest: bool, params: Params) -> list[Question]:
    return [
        (f"what colour is the {objects[i]['shape']}?", objects[i]["colour"], [i])
        for i in _subjects(objects, about_smallest)
        if unique_in(objects, "shape", i)
    ]


def _shape(rng: np.random.Generator, objects: list[dict], about_smallest: bool, params: Params) -> list[Question]:
    return [
        (f"what shape is the {objects[i]['colour']} object?", objects[i]["shape"], [i])
        for i in _subjects(objects, about_smallest)
        if unique_in(objects, "colour", i)
    ]


def _quadrant(rng: np.random.Generator, objects: list[dict], about_smallest: bool, params: Params) -> list[Question]:
    middle, margin = params.size / 2, params.midline_margin
    return [
        (f"which quadrant holds the {o['shape']}?", quadrant(o["cx"], o["cy"], params.size), [i])
        for i in _subjects(objects, about_smallest)
        if unique_in(objects, "shape", i)
        for o in [objects[i]]
        if abs(o["cx"] - middle) >= margin and abs(o["cy"] - middle) >= margin
    ]


def _count(rng: np.random.Generator, objects: list[dict], about_smallest: bool, params: Params) -> list[Question]:
    """Colours other than the smallest object's (its presence must not change the count); an absent one with
    probability ``zero_share``."""
    colours = [c for c in COLOURS if c != objects[smallest(objects)]["colour"]]
    present = [c for c in colours if any(o["colour"] == c for o in objects)]
    absent = [c for c in colours if c not in present]
    pool = absent if (rng.random() < params.zero_share or not present) else present
    return [
        (f"how many {c} objects are there?", str(len(hits)), hits)
        for c in pool
        for hits in [[i for i, o in enumerate(objects) if o["colour"] == c]]
    ]


def _exists(rng: np.random.Generator, objects: list[dict], about_smallest: bool, params: Params) -> list[Question]:
    """Yes about an object other than the smallest; no about a pair sharing a colour or shape with the scene."""
    pairs = [(o["colour"], o["shape"]) for o in objects]
    if rng.random() < 0.5:
        asked = sorted({pairs[i] for i in _subjects(objects, False)})
        return [(f"is there a {c} {s}?", "yes", [i for i, p in enumerate(pairs) if p == (c, s)]) for c, s in asked]
    colours, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
    return [
        (f"is there a {c} {s}?", "no", [])
        for c in COLOURS
        for s in SHAPES
        if (c, s) not in pairs and (c in colours or s in shapes)
    ]


_TEMPLATES: dict[str, Callable[[np.random.Generator, list[dict], bool, Params], list[Question]]] = {
    "colour": _colour,
    "shape": _shape,
    "count": _count,
    "exists": _exists,
    "quadrant": _quadrant,
}
