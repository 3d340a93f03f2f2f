"""Shared pieces of the synthetic VQA benchmarks: seeds, palette, background, shapes, placement, files.

Both benchmarks draw saturated solid shapes from one palette over a muted textured background, so the
same helpers serve :mod:`.shapes` (images) and :mod:`.motion` (videos). Everything random comes from
one ``numpy.random.Generator`` per sample, derived from ``(seed, kind, split, index)``, and pixel values
come from exact arithmetic only (uniform floats, + and *, Pillow's integer resampling and rasteriser; no
transcendental functions or BLAS), so a sample is reproducible on its own and PNG bytes are identical
from run to run.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 2  # 2: ShapesVQA at 224 px with at most 6 objects; no counting by default
SPLITS = ("train", "test")
# Saturated and far apart; the background (see background()) never gets near any of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 50),
    "blue": (30, 70, 240),
    "yellow": (245, 225, 20),
    "purple": (155, 45, 215),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
    "cyan": (20, 225, 235),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
MAX_OBJECTS = 8  # counts stay single digits "0".."8"
PNG_COMPRESS_LEVEL = 1  # level 6 is ~4x slower to write for files only ~20% smaller
MAX_SCENES = 1000  # scene redraws before a template is declared impossible for the parameters
Question = tuple[str, str, list[int]]  # question, answer, indices of the objects the answer rests on

T = TypeVar("T")
Media = Image.Image | list[Image.Image]


# ---------------------------------------------------------------- seeds and small random helpers


def sample_rng(kind: str, split: str, index: int, seed: int) -> np.random.Generator:
    """The generator of one sample: a SeedSequence child keyed by (kind, split, index), so splits never
    share a stream and sample ``index`` doesn't depend on the samples before it."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    key = (zlib.crc32(kind.encode()), SPLITS.index(split), index)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def sample_id(split: str, index: int) -> str:
    return f"{split}_{index:06d}"


def pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    """One element, uniformly (a plain Python object, unlike ``rng.choice``)."""
    return options[int(rng.integers(len(options)))]


def skewed_int(rng: np.random.Generator, low: int, high: int) -> int:
    """An integer in [low, high], denser near ``low`` (u**2 keeps the arithmetic exact)."""
    u = rng.random()
    return min(high, low + int((high - low + 1) * u * u))


# ---------------------------------------------------------------- parameters


@dataclass(frozen=True)
class BaseParams:
    """Benchmark parameters: lists become tuples (so a meta.json round trip works), then check()."""

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                object.__setattr__(self, field.name, tuple(value))
        self.check()

    def check(self) -> None:
        """Raise ValueError on inconsistent values."""

    def as_dict(self) -> dict[str, Any]:
        return {field.name: _plain(getattr(self, field.name)) for field in fields(self)}


P = TypeVar("P", bound=BaseParams)


def make_params(cls: type[P], params: dict[str, Any]) -> P:
    """``cls(**params)`` with an error that lists the known names instead of a bare TypeError."""
    known = [field.name for field in fields(cls)]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise TypeError(f"unknown parameter(s) {unknown}; known: {known}")
    return cls(**params)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def is_about_smallest(index: int, share: float) -> bool:
    """Whether sample ``index`` targets the smallest object: exactly floor(n * share) of samples 0..n-1 do."""
    return math.floor((index + 1) * share + 1e-9) > math.floor(index * share + 1e-9)


# ---------------------------------------------------------------- background


def background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Muted clutter: smooth low-contrast colour noise, faint blobs and random-walk strokes.

    Every pixel stays greyish (channels within ~35 of each other) and within [30, 200], so nothing in the
    background is near a palette colour and the shapes remain the only salient content. Pixel values come
    from Pillow's fixed-point bilinear resize of a uint8 grid, hence are exact. (No per-pixel grain: it
    would double the PNG sizes for no visible texture.)
    """
    base = rng.uniform(85.0, 140.0) + rng.uniform(-8.0, 8.0, 3)
    grid = (height // _CELL + 2, width // _CELL + 2)
    coarse = base + 22.0 * rng.uniform(-1.0, 1.0, (*grid, 1)) + 5.0 * rng.uniform(-1.0, 1.0, (*grid, 3))
    smooth = Image.fromarray(np.clip(coarse, 30.0, 200.0).astype(np.uint8), "RGB")
    image = smooth.resize((width, height), Image.Resampling.BILINEAR)
    _clutter(rng, ImageDraw.Draw(image), base, width, height)
    return image


_CELL = 40  # px per cell of the smooth noise


def _clutter(rng: np.random.Generator, draw: ImageDraw.ImageDraw, base: np.ndarray, width: int, height: int) -> None:
    """Faint blobs and random-walk strokes in colours a little off the base (low saturation, low contrast)."""
    scale = math.sqrt(width * height) / 448  # clutter density and extent follow the canvas
    blobs = int(rng.integers(6, 14) * scale**2) + 1
    centres = rng.uniform(0, (width, height), (blobs, 2))
    radii = rng.uniform(8, 50, (blobs, 2)) * scale
    for (cx, cy), (rx, ry), fill in zip(centres.tolist(), radii.tolist(), _muted(rng, base, 18, blobs), strict=True):
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
    strokes = int(rng.integers(12, 30) * scale**2) + 1
    steps = rng.uniform(-40, 40, (strokes, 6, 2)) * scale
    walks = np.cumsum(steps, axis=1) + rng.uniform(0, (width, height), (strokes, 1, 2))
    lengths = rng.integers(3, 7, strokes).tolist()
    widths = rng.integers(1, 4, strokes).tolist()
    for walk, n, w, fill in zip(walks.tolist(), lengths, widths, _muted(rng, base, 28, strokes), strict=True):
        draw.line([tuple(point) for point in walk[:n]], fill=fill, width=w)


def _muted(rng: np.random.Generator, base: np.ndarray, contrast: float, n: int) -> list[tuple[int, ...]]:
    """n colours near ``base``: a brightness shift within +-contrast and a slight tint."""
    colours = base + rng.uniform(-contrast, contrast, (n, 1)) + rng.uniform(-8.0, 8.0, (n, 3))
    return [tuple(c) for c in np.clip(colours, 30.0, 200.0).astype(np.uint8).tolist()]


# ---------------------------------------------------------------- shapes


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    radii = [1.0 if k % 2 == 0 else inner for k in range(2 * points)]
    return np.array([(r * math.cos(a), r * math.sin(a)) for r, a in zip(radii, angles, strict=True)])


_A = 1 / 3  # half the width of a cross arm
# Unit outlines inside the box [-1, 1]^2; every one contains its centre with room to spare.
_OUTLINES: dict[str, np.ndarray] = {
    "square": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
    "triangle": np.array([(0, -1), (1, 1), (-1, 1)], dtype=float),
    "diamond": np.array([(0, -1), (1, 0), (0, 1), (-1, 0)], dtype=float),
    "hexagon": np.array([(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]),
    "star": _star(),
    "cross": np.array(
        [(-_A, -1), (_A, -1), (_A, -_A), (1, -_A), (1, _A), (_A, _A)]
        + [(_A, 1), (-_A, 1), (-_A, _A), (-1, _A), (-1, -_A), (-_A, -_A)]
    ),
}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: int, cy: int, size: int) -> None:
    """A solid ``shape`` filling a ``size``-pixel box centred on (cx, cy), without antialiasing (exact colour)."""
    _fill(draw, shape, cx, cy, size, COLOURS[colour])


def shape_mask(shape: str, cx: int, cy: int, size: int, width: int, height: int) -> np.ndarray:
    """The (height, width) boolean mask of the pixels :func:`draw_shape` paints for the same arguments."""
    mask = Image.new("L", (width, height))
    _fill(ImageDraw.Draw(mask), shape, cx, cy, size, 1)
    return np.asarray(mask, dtype=bool)


def _fill(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, size: int, fill: tuple[int, int, int] | int) -> None:
    r = (size - 1) / 2
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        draw.polygon([(float(x), float(y)) for x, y in _OUTLINES[shape] * r + (cx, cy)], fill=fill)


def fit_cells(size: int, cell: int) -> int:
    """``size`` grown to fill whole ``cell``-px cells less a 4 px border, so that a from-scratch ViT sees each
    shape in one of a few grid phases and learns it within a CPU hour (``cell`` 0: ``size`` unchanged)."""
    return math.ceil(size / cell) * cell - 4 if cell else size


def place(
    rng: np.random.Generator,
    placed: np.ndarray,
    radii: np.ndarray,
    offsets: np.ndarray,
    radius: float,
    canvas: int,
    margin: int,
    tries: int = 4,
    cell: int = 0,
) -> np.ndarray | None:
    """A track (frames, 2) = start + ``offsets`` whose box stays on the canvas and ``margin`` px clear of every
    placed track (``placed``: (k, frames, 2), half-sizes ``radii``) in every frame; None if ``tries`` batches of
    64 random starts all fail (rejection sampling, vectorised over candidates). With a ``cell`` the start's box
    fills whole cells of a ``cell``-px grid: its centre sits on a cell centre (odd box widths in cells) or corner;
    0 places it on any pixel."""
    edge = 2 + radius
    low = np.ceil(edge - offsets.min(axis=0)).astype(np.int64)
    high = np.floor(canvas - edge - offsets.max(axis=0)).astype(np.int64)
    step = max(1, cell)
    phase = math.ceil(2 * radius / step) * step // 2 % step
    first = low + (phase - low) % step
    if np.any(first > high):
        return None
    for _ in range(tries):
        starts = first + step * rng.integers(0, (high - first) // step + 1, (64, 2))
        tracks = starts[:, None, :] + offsets[None]
        if not len(placed):
            return tracks[0]
        gap = np.abs(tracks[:, None] - placed[None]).max(-1) - (radius + radii)[None, :, None]
        ok = (gap >= margin).all(axis=(1, 2))
        if ok.any():
            return tracks[int(np.argmax(ok))]
    return None


def unique_in(objects: Sequence[dict], key: str, index: int) -> bool:
    """Whether ``objects[index][key]`` occurs once among ``objects``."""
    return sum(o[key] == objects[index][key] for o in objects) == 1


# ---------------------------------------------------------------- files


def save_png(image: Image.Image, path: Path) -> None:
    """Fixed options and no metadata chunks, so the bytes depend on the pixels only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)


def save_media(directory: Path, record: dict, media: Media) -> None:
    """Write a record's image (``record["image"]``) or frames (``record["video"]/frame_000.png`` ...)."""
    if isinstance(media, Image.Image):
        save_png(media, directory / record["image"])
    else:
        for t, frame in enumerate(media):
            save_png(frame, directory / record["video"] / frame_name(t))


def open_media(directory: Path, record: dict) -> Media:
    """The image or frame list of a written record, fully loaded as RGB."""
    if "image" in record:
        return _open_png(directory / record["image"])
    return [_open_png(directory / record["video"] / frame_name(t)) for t in range(record["frames"])]


def frame_name(t: int) -> str:
    return f"frame_{t:03d}.png"


def _open_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8", newline="\n")


def replace_dir(staging: Path, target: Path) -> None:
    """Move a finished ``staging`` directory to ``target``, replacing a previous generation there (one
    with a meta.json) but refusing to delete a non-empty directory that isn't one."""
    check_replaceable(target)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def check_replaceable(target: Path) -> None:
    if target.is_dir() and not (target / "meta.json").is_file() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a generated dataset (no meta.json); not overwriting it")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
