"""Per-layer bit widths under a budget: the least predicted error a calibration allows, found exactly by a
multiple-choice knapsack over the budget."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from tokred.kv.cache import FULL
from tokred.weights.quant import WEIGHT_WIDTHS

if TYPE_CHECKING:
    from tokred.weights.calibrate import Calibration

CELLS = 1 << 16
"""Steps the budget's range is cut into at most (the knapsack's table width)."""


def allocate(
    calibration: Calibration,
    avg_bits: float | None = None,
    max_bytes: int | None = None,
    candidates: tuple[int, ...] = (2, 3, 4, 8, FULL),
) -> dict[str, int]:
    """A width from `candidates` for each layer of `calibration` (16: left unquantized) that minimises the total
    `penalties` while holding exactly one budget: `avg_bits`, the parameter-weighted mean code width, or
    `max_bytes`, what the layers then hold (codes, a float16 scale and zero per group as `QuantizedWeight` counts
    them; 2 bytes a weight at 16 bits). The budget is never exceeded.

    Solved as a multiple-choice knapsack by dynamic programming over the budget, in steps of the greatest common
    divisor of the costs' differences: exact wherever the range then fits `CELLS` steps (every tiny zoo model).
    Wider ranges take coarser steps, each layer's cost rounded up to a step (so the budget still holds); the step
    depends on the calibration alone, never on the budget, so a larger budget never predicts more error.
    """
    names = list(calibration.layers)
    widths = _check_widths(calibration, candidates)
    if (avg_bits is None) == (max_bytes is None):
        raise ValueError(f"give exactly one budget, avg_bits or max_bytes; got {avg_bits=} and {max_bytes=}")
    stats = [calibration.layers[name] for name in names]
    if avg_bits is not None:
        _check_number("avg_bits", avg_bits)
        costs = [[s.params * b for b in widths] for s in stats]
        budget = math.floor(Fraction(avg_bits) * sum(s.params for s in stats))
    else:
        _check_number("max_bytes", max_bytes)
        costs = [[2 * s.params if b == FULL else s.nbytes[b] for b in widths] for s in stats]
        budget = math.floor(max_bytes)
    least = sum(min(c) for c in costs)
    if least > budget:
        total = sum(s.params for s in stats)
        smallest = f"{least / total:g} bits" if avg_bits is not None else f"{least} bytes"
        given = f"avg_bits={avg_bits}" if avg_bits is not None else f"max_bytes={max_bytes}"
        raise ValueError(
            f"{given} is below the smallest achievable budget, {smallest} (every layer at {widths[0]} bits)"
        )
    table = penalties(calibration, widths)
    errors = [[table[name][b] for b in widths] for name in names]
    chosen = _knapsack(costs, errors, budget)
    return {name: widths[j] for name, j in zip(names, chosen, strict=True)}


def penalties(calibration: Calibration, candidates: Iterable[int]) -> dict[str, dict[int, float]]:
    """Each layer's predicted error at each width: its measured relative output error, weighted by its share of
    the parameters and by LUQ's entropy criterion,

        p_i(b) = (n_i / N) * (H_i / H) * e_i(b),    e_i(16) = 0,

    n_i its parameters, N their sum, H_i its output entropy on the vision tokens and H the parameter-weighted
    mean of the H_i (every weight 1 where all are 0). A layer of higher entropy than the mean pays more for the
    same error, so low bits go first to the layers LUQ finds tolerant of them."""
    stats = calibration.layers.values()
    total = sum(s.params for s in stats)
    mean = sum(s.params * s.entropy for s in stats) / total
    return {
        name: {
            b: 0.0 if b == FULL else s.params / total * (s.entropy / mean if mean > 0 else 1.0) * s.errors[b]
            for b in candidates
        }
        for name, s in calibration.layers.items()
    }


def predicted_error(calibration: Calibration, bit_map: Mapping[str, int]) -> float:
    """The total of `penalties` a map from layer names to widths incurs (what `allocate` minimises)."""
    table = penalties(calibration, set(bit_map.values()))
    return sum(table[name][b] for name, b in bit_map.items())


def uniform(calibration_or_names: Calibration | Iterable[str], bits: int) -> dict[str, int]:
    """Every layer of a calibration (or every name given) at one width."""
    if isinstance(bits, bool) or bits not in (*WEIGHT_WIDTHS, FULL):
        allowed = ", ".join(map(str, WEIGHT_WIDTHS))
        raise ValueError(f"bits must be one of {allowed} (or {FULL}: not quantized), got {bits!r}")
    return dict.fromkeys(getattr(calibration_or_names, "layers", calibration_or_names), bits)


def _knapsack(costs: list[list[int]], errors: list[list[float]], budget: int) -> list[int]:
    """Index of each layer's choice minimising the summed errors with summed costs at most `budget` (which the
    cheapest choices meet). Costs are counted above each layer's cheapest, in steps (see `allocate`)."""
    extra = [[c - min(row) for c in row] for row in costs]
    room = budget - sum(min(row) for row in costs)
    span = sum(max(row) for row in extra)
    step = math.gcd(*(c for row in extra for c in row)) or 1
    step *= -(-span // (step * CELLS)) or 1
    weights = [[-(-c // step) for c in row] for row in extra]
    cells = min(room // step, sum(max(row) for row in weights)) + 1
    best = np.zeros(cells)  # least error of the layers so far within each budget
    picks = np.zeros((len(costs), cells), dtype=np.int8)
    for i, (row, err) in enumerate(zip(weights, errors, strict=True)):
        options = np.full((len(row), cells), np.inf)
        for j, (w, e) in enumerate(zip(row, err, strict=True)):
            options[j, w:] = best[: max(cells - w, 0)] + e
        picks[i] = options.argmin(0)
        best = options[picks[i], np.arange(cells)]
    chosen, cell = [], cells - 1
    for i in reversed(range(len(costs))):
        j = int(picks[i, cell])
        chosen.append(j)
        cell -= weights[i][j]
    return chosen[::-1]


def _check_widths(calibration: Calibration, candidates: tuple[int, ...]) -> tuple[int, ...]:
    """The candidates sorted, after checking each is a width the calibration measured (or 16)."""
    measured = (*calibration.candidates, FULL)
    if (
        not isinstance(candidates, tuple)
        or not candidates
        or len(set(candidates)) != len(candidates)
        or any(isinstance(b, bool) or b not in measured for b in candidates)
    ):
        raise ValueError(
            f"candidates must be a tuple of distinct widths this calibration measured, "
            f"{', '.join(map(str, measured))} (16: not quantized); got {candidates!r}"
        )
    return tuple(sorted(candidates))


def _check_number(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be a positive number, got {value!r}")
