"""The base of every method config, the stages they belong to, and the method registry."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokred.tokens import VisionTokens

STAGES = ("frames", "encoder", "pre_llm", "llm", "kv", "weights")

METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Method:
    """Base of every method: its config fields are the dataclass fields, its name and stage class constants
    (set by `register`). Kinds below it say what a method does; today: `TokenReducer`."""

    stage: ClassVar[str]
    name: ClassVar[str]

    @classmethod
    def example(cls) -> Method:
        """A setting that acts on every tiny zoo model; the conformance tests run each method at it."""
        return cls()

    @property
    def idle(self) -> bool:
        """True when the method can change nothing, so its stage is skipped and outputs stay bit-identical."""
        return False


@dataclass(frozen=True)
class TokenReducer(Method):
    """A method that keeps a budget of each image's or video's tokens (`select` returns which).

    `keep` is the fraction of each image's or video's tokens that reach the LLM; `keep_tokens`, when given,
    is an absolute count per image or video and wins over `keep`. Counts round half up and never drop
    below one token: k = min(n, max(1, floor(keep * n + 0.5))).
    """

    keep: float = 0.5
    keep_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"{type(self).__name__}.keep must be a number in (0, 1], got {self.keep!r}")
        if not 0.0 < self.keep <= 1.0 or math.isnan(self.keep):
            raise ValueError(f"{type(self).__name__}.keep must be in (0, 1], got {self.keep!r}")
        if self.keep_tokens is not None and (
            isinstance(self.keep_tokens, bool) or not isinstance(self.keep_tokens, int) or self.keep_tokens < 1
        ):
            raise ValueError(f"{type(self).__name__}.keep_tokens must be an integer >= 1, got {self.keep_tokens!r}")

    def budget(self, n: int) -> int:
        """How many of a span's n tokens this method keeps."""
        if self.keep_tokens is not None:
            return min(n, self.keep_tokens)
        return min(n, max(1, math.floor(self.keep * n + 0.5)))

    @classmethod
    def example(cls) -> TokenReducer:
        return cls(keep=0.25)

    @property
    def idle(self) -> bool:
        return self.keep_tokens is None and self.keep == 1.0

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        """Return the ascending indices (into the span) of the k tokens to keep."""
        raise NotImplementedError


def register(name: str, stage: str):
    """Class decorator: record a method under `name` for `stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def wrap(cls: type[Method]) -> type[Method]:
        cls.name, cls.stage = name, stage
        METHODS[name] = cls
        return cls

    return wrap
