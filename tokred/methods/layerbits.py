"""Weight schemes: LUQ's per-layer widths under an average-bits budget (LayerBits), and one width for all (UniformBits).

Both read the model's LLM linear layers, and LayerBits its calibration, through `tokred.weights.calibrate`, imported
where `bit_map` runs: that module reaches the adapters and the zoo's calibration set, which a method's import never
does.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from torch import nn

from tokred.kv.cache import FULL
from tokred.methods.base import WeightScheme, _whole, register
from tokred.weights.allocate import allocate, uniform
from tokred.weights.quant import WEIGHT_WIDTHS

WIDTHS = (*WEIGHT_WIDTHS, FULL)


@register("layerbits", stage="weights")
@dataclass(frozen=True)
class LayerBits(WeightScheme):
    """LUQ (Bhatnagar et al., 2025): each LLM linear layer gets a width from `candidates` so that the
    parameter-weighted mean code width is at most `avg_bits`, minimising the calibration's predicted error
    (`tokred.weights.allocate`: measured output error weighted by the layer's parameter share and its output entropy
    on vision tokens; low-entropy layers take the low bits). `calibration` is a saved `Calibration` JSON; without
    one, `bit_map` calibrates on 32 ShapesVQA samples with the processor saved beside the model. Codes take a
    float16 scale and zero per `group` input channels. Departs from the paper: LUQ ranks whole transformer layers by
    their output entropy alone and gives the lowest-ranked ultra-low bits; this picks a width per linear layer by
    measured output error and entropy together, and rounds each group to its nearest min/max level (no
    error-compensating quantizer)."""

    avg_bits: float = 3.0
    group: int = 64
    calibration: str | None = None
    candidates: tuple[int, ...] = (2, 3, 4, 8, FULL)

    def __post_init__(self) -> None:
        _check_fields(self)
        candidates = self.candidates
        if not isinstance(candidates, tuple) or not candidates or len(set(candidates)) != len(candidates):
            raise ValueError(f"LayerBits.candidates must be a non-empty tuple of distinct widths, got {candidates!r}")
        if any(isinstance(b, bool) or b not in WIDTHS for b in candidates):
            allowed = ", ".join(map(str, WIDTHS))
            raise ValueError(
                f"LayerBits.candidates must be widths from {allowed} (16: not quantized), got {candidates}"
            )
        object.__setattr__(self, "candidates", tuple(sorted(candidates)))
        if isinstance(self.avg_bits, bool) or not isinstance(self.avg_bits, (int, float)):
            raise TypeError(f"LayerBits.avg_bits must be a number, got {self.avg_bits!r}")
        if not min(candidates) <= self.avg_bits <= FULL:
            raise ValueError(
                f"LayerBits.avg_bits must be between the smallest candidate width, {min(candidates)}, and {FULL} "
                f"(nothing quantized), got {self.avg_bits!r}"
            )
        if self.calibration is not None:
            if not isinstance(self.calibration, (str, os.PathLike)):
                raise TypeError(f"LayerBits.calibration must be a path to a calibration JSON, got {self.calibration!r}")
            object.__setattr__(self, "calibration", os.fspath(self.calibration))

    @classmethod
    def example(cls) -> LayerBits:
        # mixes 2- and 3-bit layers on every tiny zoo model; 32 divides their 64- and 128-wide inputs
        return cls(avg_bits=2.5, group=32)

    @property
    def idle(self) -> bool:
        return self.avg_bits == FULL and FULL in self.candidates

    def as_idle(self) -> LayerBits:
        return dataclasses.replace(self, avg_bits=float(FULL), candidates=tuple(sorted({*self.candidates, FULL})))

    def bit_map(self, model: nn.Module) -> dict[str, int]:
        from tokred.weights.calibrate import calibration_for, llm_linears

        if self.idle:
            return uniform(llm_linears(model), FULL)
        widths = tuple(b for b in self.candidates if b != FULL)
        calibration = calibration_for(model, self.calibration, group=self.group, candidates=widths)
        return allocate(calibration, avg_bits=self.avg_bits, candidates=self.candidates)


@register("uniform_bits", stage="weights")
@dataclass(frozen=True)
class UniformBits(WeightScheme):
    """Every LLM linear layer at `bits` (16: none quantized), a float16 scale and zero per `group` input channels:
    the baseline LayerBits is measured against."""

    bits: int = 4
    group: int = 64

    def __post_init__(self) -> None:
        _check_fields(self)
        if isinstance(self.bits, bool) or self.bits not in WIDTHS:
            allowed = ", ".join(map(str, WEIGHT_WIDTHS))
            raise ValueError(f"UniformBits.bits must be one of {allowed} (or {FULL}: not quantized), got {self.bits!r}")

    @classmethod
    def example(cls) -> UniformBits:
        return cls(bits=3, group=32)  # 3-bit codes are packed as a bit stream, the widths' odd one out

    @property
    def idle(self) -> bool:
        return self.bits == FULL

    def as_idle(self) -> UniformBits:
        return dataclasses.replace(self, bits=FULL)

    def bit_map(self, model: nn.Module) -> dict[str, int]:
        from tokred.weights.calibrate import check_group, llm_linears

        layers = llm_linears(model)
        if not self.idle:
            check_group(layers, self.group)
        return uniform(layers, self.bits)


def _check_fields(scheme: LayerBits | UniformBits) -> None:
    """The field both schemes share: `group`, the input channels a scale and zero cover."""
    if not _whole(scheme.group, 1):
        raise ValueError(f"{type(scheme).__name__}.group must be an integer >= 1, got {scheme.group!r}")
