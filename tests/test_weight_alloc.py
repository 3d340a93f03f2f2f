"""The per-layer bit allocator (tokred.weights.allocate) on synthetic calibrations: the budget always holds, the
answer is the brute-force optimum, more budget never predicts more error, and LUQ's entropy criterion decides ties."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from tokred.weights.allocate import CELLS, allocate, predicted_error, uniform
from tokred.weights.calibrate import Calibration, LayerStats

WIDTHS = (2, 3, 4, 8, 16)
GROUP = 64


def layer(shape: tuple[int, int], entropy: float, errors: dict[int, float]) -> LayerStats:
    out, inputs = shape
    nbytes = {b: out * (inputs * b // 8 + 4 * inputs // GROUP) for b in errors}  # codes + fp16 scale and zero
    return LayerStats(shape, entropy, errors, nbytes)


def synthetic(rng: np.random.Generator, n: int, sides=(64, 128, 192, 256, 512)) -> Calibration:
    """n layers of random shapes, entropies (some 0) and errors falling with the width."""
    layers = {}
    for i in range(n):
        shape = (int(rng.choice(sides)), int(rng.choice(sides)))
        errors = dict(zip((2, 3, 4, 8), sorted(rng.uniform(0.001, 1.0, 4), reverse=True), strict=True))
        entropy = 0.0 if rng.random() < 0.15 else float(rng.uniform(0.5, 8.0))
        layers[f"layers.{i}.proj"] = layer(shape, entropy, errors)
    return Calibration("synthetic", GROUP, (2, 3, 4, 8), 0, layers)


def objective(calibration: Calibration, bit_map: dict[str, int]) -> float:
    """LUQ's predicted error as allocate's docstring states it, written out independently."""
    stats = calibration.layers
    total = sum(s.params for s in stats.values())
    mean = sum(s.params * s.entropy for s in stats.values()) / total
    return sum(
        stats[name].params
        / total
        * (stats[name].entropy / mean if mean else 1.0)
        * (0.0 if b == 16 else stats[name].errors[b])
        for name, b in bit_map.items()
    )


def average_bits(calibration: Calibration, bit_map: dict[str, int]) -> float:
    stats = calibration.layers
    return sum(stats[n].params * b for n, b in bit_map.items()) / sum(s.params for s in stats.values())


def total_bytes(calibration: Calibration, bit_map: dict[str, int]) -> int:
    stats = calibration.layers
    return sum(2 * stats[n].params if b == 16 else stats[n].nbytes[b] for n, b in bit_map.items())


MEASURES = {"avg_bits": average_bits, "max_bytes": total_bytes}
"""What each budget limits, as a function of (calibration, bit map)."""


def brute_force(calibration: Calibration, widths: tuple[int, ...], budget: str, limit: float) -> float:
    """The least objective over every assignment of widths whose `budget` measure is at most `limit`."""
    names = list(calibration.layers)
    maps = (dict(zip(names, combo, strict=True)) for combo in itertools.product(widths, repeat=len(names)))
    return min(objective(calibration, m) for m in maps if MEASURES[budget](calibration, m) <= limit)


@pytest.mark.parametrize("budget", ["avg_bits", "max_bytes"])
def test_the_allocation_is_the_brute_force_optimum_within_budget(budget):
    rng = np.random.default_rng(0)
    for _ in range(60):
        calibration = synthetic(rng, int(rng.integers(1, 5)))
        widths = tuple(sorted(rng.choice(WIDTHS, int(rng.integers(2, 6)), replace=False).tolist()))
        if budget == "avg_bits":
            limit = float(rng.choice([rng.uniform(widths[0], 17), *widths]))
        else:
            least, most = (total_bytes(calibration, uniform(calibration, widths[i])) for i in (0, -1))
            limit = int(rng.integers(least, most + 100))
        bit_map = allocate(calibration, candidates=widths, **{budget: limit})
        assert MEASURES[budget](calibration, bit_map) <= limit
        assert list(bit_map) == list(calibration.layers) and set(bit_map.values()) <= set(widths)
        best = brute_force(calibration, widths, budget, limit)
        assert objective(calibration, bit_map) == pytest.approx(best, rel=1e-12, abs=1e-15)
        assert predicted_error(calibration, bit_map) == pytest.approx(objective(calibration, bit_map), rel=1e-12)


def test_large_models_take_coarse_steps_and_still_hold_the_budget_and_monotone():
    rng = np.random.default_rng(1)
    calibration = synthetic(rng, 48, sides=(1024, 4096, 11008, 3584, 18944))
    params = [s.params for s in calibration.layers.values()]
    assert sum(params) * 14 // math.gcd(*params) > CELLS  # too wide for exact steps: the rounded path runs
    previous = math.inf
    for limit in np.linspace(2.0, 16.0, 29):
        bit_map = allocate(calibration, avg_bits=float(limit))
        assert average_bits(calibration, bit_map) <= limit
        error = objective(calibration, bit_map)
        assert error <= previous * (1 + 1e-12)
        previous = error
    assert previous == 0.0  # at 16 bits nothing is quantized
    for limit in np.linspace(total_bytes(calibration, uniform(calibration, 2)), 2 * sum(params), 17):
        assert total_bytes(calibration, allocate(calibration, max_bytes=int(limit))) <= limit


@pytest.mark.parametrize("budget", ["avg_bits", "max_bytes"])
def test_a_bigger_budget_never_predicts_more_error(budget):
    rng = np.random.default_rng(2)
    for _ in range(10):
        calibration = synthetic(rng, 12)
        if budget == "avg_bits":
            limits = np.linspace(2.0, 16.0, 57)
        else:
            limits = np.linspace(
                total_bytes(calibration, uniform(calibration, 2)),
                total_bytes(calibration, uniform(calibration, 16)),
                57,
            )
        errors = [objective(calibration, allocate(calibration, **{budget: float(limit)})) for limit in limits]
        assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(errors)), errors
        assert errors[-1] == 0.0


def equal_layers(entropies: list[float]) -> Calibration:
    """Layers alike but for their entropy: one shape, errors 2^-b (convex, so no mix beats a uniform width)."""
    errors = {b: 2.0**-b for b in (2, 3, 4, 8)}
    layers = {f"layers.{i}.proj": layer((128, 256), h, errors) for i, h in enumerate(entropies)}
    return Calibration("synthetic", GROUP, (2, 3, 4, 8), 0, layers)


@pytest.mark.parametrize("bits", WIDTHS)
def test_a_uniform_budget_gives_a_uniform_map_when_layers_are_alike(bits):
    calibration = equal_layers([5.0] * 6)
    assert allocate(calibration, avg_bits=bits) == uniform(calibration, bits)
    assert allocate(calibration, max_bytes=total_bytes(calibration, uniform(calibration, bits))) == uniform(
        calibration, bits
    )


def test_low_entropy_layers_take_the_low_bits():
    entropies = [6.0, 1.5, 7.5, 3.0]
    calibration = equal_layers(entropies)
    bit_map = allocate(calibration, avg_bits=3.0, candidates=(2, 4))
    assert bit_map == {"layers.0.proj": 4, "layers.1.proj": 2, "layers.2.proj": 4, "layers.3.proj": 2}
    calibration = equal_layers([6.0, 1.5, 7.5, 3.0, 0.0, 4.5, 2.0])
    order = sorted(calibration.layers, key=lambda n: calibration.layers[n].entropy)
    for limit in np.linspace(2.0, 16.0, 29):
        bits = [allocate(calibration, avg_bits=float(limit))[name] for name in order]
        assert bits == sorted(bits), (limit, bits)  # never more bits for a layer of lower entropy


def test_budgets_below_the_smallest_width_are_refused_with_the_least_achievable():
    calibration = equal_layers([1.0, 2.0])
    with pytest.raises(ValueError, match=r"avg_bits=1.5 is below the smallest achievable budget, 2 bits"):
        allocate(calibration, avg_bits=1.5)
    with pytest.raises(ValueError, match=r"avg_bits=2.5 is below the smallest achievable budget, 3 bits"):
        allocate(calibration, avg_bits=2.5, candidates=(3, 8))
    least = total_bytes(calibration, uniform(calibration, 2))
    with pytest.raises(
        ValueError, match=rf"max_bytes={least - 1} is below the smallest achievable budget, {least} bytes"
    ):
        allocate(calibration, max_bytes=least - 1)
    assert allocate(calibration, max_bytes=least) == uniform(calibration, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one budget"),
        ({"avg_bits": 3.0, "max_bytes": 10**6}, "exactly one budget"),
        ({"avg_bits": float("nan")}, "avg_bits must be a positive number"),
        ({"max_bytes": -5}, "max_bytes must be a positive number"),
        ({"avg_bits": 3.0, "candidates": (1, 2)}, "widths this calibration measured, 2, 3, 4, 8, 16"),
        ({"avg_bits": 3.0, "candidates": (2, 2)}, "distinct"),
        ({"avg_bits": 3.0, "candidates": [2, 4]}, "a tuple"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        allocate(equal_layers([1.0]), **kwargs)


def test_widths_the_calibration_did_not_measure_are_refused():
    calibration = Calibration("synthetic", GROUP, (2, 4), 0, {"a": layer((64, 64), 1.0, {2: 0.5, 4: 0.1})})
    with pytest.raises(ValueError, match="measured, 2, 4, 16"):
        allocate(calibration, avg_bits=3.0)
    assert allocate(calibration, avg_bits=3.0, candidates=(2, 4, 16)) == {"a": 2}


def test_uniform_and_bit_maps_round_trip_through_json():
    calibration = equal_layers([1.0, 2.0, 3.0])
    assert uniform(calibration, 8) == dict.fromkeys(calibration.layers, 8)
    assert uniform(["x", "y"], 16) == {"x": 16, "y": 16}
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        uniform(calibration, 5)
    bit_map = allocate(calibration, avg_bits=3.0)
    assert json.loads(json.dumps(bit_map)) == bit_map
