"""The picture of what a patched model kept: each vision token's patch, greyed where it was dropped.

Cells are indexed like the LLM's vision tokens: flat over the token grid (t, h, w) in raster order, one
frame per temporal slice. Cells in neither `kept` nor a `merged` group are dropped: their pixels become a
dimmed grey of their luminance. Each merged group (several cells now one token) keeps its pixels and gets an
outline along its border in every frame it touches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

CELL = 28
"""Default pixels per token cell: a Qwen-VL token's patch (2 x 2 patches of 14 px) at the processor's scale."""
GAP = 4
"""White pixels between the frames of a strip."""
OUTLINE = (255, 0, 255)
"""Colour of a merged group's border."""
OUTLINE_WIDTH = 2


def grey(pixels: np.ndarray) -> np.ndarray:
    """A dropped cell's pixels: 40 + luminance / 4 on every channel (R == G == B: dark grey, the content faint)."""
    luminance = np.asarray(Image.fromarray(pixels).convert("L"), dtype=np.uint16)
    return np.repeat((40 + luminance // 4).astype(np.uint8)[..., None], 3, axis=2)


def strip(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames of one size side by side, GAP white pixels apart."""
    width, height = frames[0].size
    out = Image.new("RGB", (len(frames) * width + (len(frames) - 1) * GAP, height), "white")
    for i, frame in enumerate(frames):
        out.paste(frame, (i * (width + GAP), 0))
    return out


def overlay(
    frames: Sequence[Image.Image],
    grid: tuple[int, int, int],
    kept: Iterable[int],
    merged: Sequence[Sequence[int]] = (),
    cell: int = CELL,
) -> Image.Image:
    """One frame per temporal slice of `grid`, each resized to w x h cells of `cell` pixels, as a strip.

    `kept`: flat indices of cells whose token survived as itself; `merged`: groups of flat indices that became
    one token each. Every other cell is greyed (see `grey`).
    """
    t, h, w = grid
    if len(frames) != t:
        raise ValueError(f"the token grid has {t} temporal slice(s) but {len(frames)} frame(s) were given")
    n = t * h * w
    kept = set(map(int, kept))
    groups = [set(map(int, group)) for group in merged]
    outside = sorted(i for i in kept.union(*groups) if not 0 <= i < n)
    if outside:
        raise ValueError(f"cell indices {outside[:5]} are outside the {t}x{h}x{w} token grid")
    alive = np.zeros(n, dtype=bool)
    alive[list(kept.union(*groups))] = True
    pictures = []
    for i, frame in enumerate(frames):
        pixels = np.array(frame.convert("RGB").resize((w * cell, h * cell), Image.Resampling.BILINEAR))
        mask = np.kron(alive[i * h * w : (i + 1) * h * w].reshape(h, w), np.ones((cell, cell), dtype=bool))
        pixels = np.where(mask[..., None], pixels, grey(pixels))
        for group in groups:
            _outline(pixels, {j - i * h * w for j in group if i * h * w <= j < (i + 1) * h * w}, w, cell)
        pictures.append(Image.fromarray(pixels))
    return strip(pictures)


def _outline(pixels: np.ndarray, cells: set[int], w: int, cell: int) -> None:
    """Paint, in place, the edges of `cells` (flat indices in one frame) that do not touch another of them."""
    edge = OUTLINE_WIDTH
    for c in cells:
        y, x = divmod(c, w)
        top, left = y * cell, x * cell
        if c - w not in cells:
            pixels[top : top + edge, left : left + cell] = OUTLINE
        if c + w not in cells:
            pixels[top + cell - edge : top + cell, left : left + cell] = OUTLINE
        if x == 0 or c - 1 not in cells:
            pixels[top : top + cell, left : left + edge] = OUTLINE
        if x == w - 1 or c + 1 not in cells:
            pixels[top : top + cell, left + cell - edge : left + cell] = OUTLINE
