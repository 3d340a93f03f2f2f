"""Which vision tokens each object of a scene covers: ground truth for training aids and for target recall.

A square image or clip of ``size`` pixels reaches the LLM as a (t, h, w) grid of tokens in raster order, one
temporal slot per two frames (slot ``t`` shows frame ``2 t``). A token covers an object when any of the
object's pixels fall in its cell.
"""

from __future__ import annotations

import numpy as np

from tokred.zoo.datasets.common import shape_mask


def coverage(record: dict, grid: tuple[int, int, int], size: int) -> np.ndarray:
    """(objects, t*h*w) share of each token's cell that each of the record's objects paints (0 where absent)."""
    t, h, w = grid
    cell = size // w
    if cell * w != size or cell * h != size:
        raise ValueError(f"a {h}x{w} token grid does not tile a {size} px square")
    out = np.zeros((len(record["objects"]), t, h, w), np.float32)
    for i, o in enumerate(record["objects"]):
        shares: dict[tuple[int, int], np.ndarray] = {}  # per position: drawn once while the object stays there
        for slot in range(t):
            frame = 2 * slot
            if "track" in o and not o["appear"] <= frame < o["disappear"]:
                continue
            cx, cy = o["track"][frame] if "track" in o else (o["cx"], o["cy"])
            if (cx, cy) not in shares:
                mask = shape_mask(o["shape"], cx, cy, o["size"], size, size)
                shares[cx, cy] = mask.reshape(h, cell, w, cell).mean(axis=(1, 3))
            out[i, slot] = shares[cx, cy]
    return out.reshape(len(record["objects"]), -1)


def owners(record: dict, grid: tuple[int, int, int], size: int) -> np.ndarray:
    """(t*h*w,) the object painting most of each token's cell, -1 for background."""
    shares = coverage(record, grid, size)
    if not len(shares):
        return np.full(int(np.prod(grid)), -1)
    return np.where(shares.max(0) > 0, shares.argmax(0), -1)


def target_tokens(record: dict, grid: tuple[int, int, int], size: int) -> np.ndarray:
    """(t*h*w,) bool: the tokens covering any object the record's answer rests on (its ``targets``)."""
    shares = coverage(record, grid, size)
    return (shares[record["targets"]] > 0).any(0) if record["targets"] else np.zeros(shares.shape[1], bool)
