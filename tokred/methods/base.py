"""The base of every method config, the stages they belong to, and the method registry."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokred.kv.cache import FULL, QuantizedKVCache
from tokred.methods.merging import fold_into_kept
from tokred.tokens import Merge, VisionTokens

STAGES = ("frames", "encoder", "pre_llm", "llm", "kv", "weights")

METHODS: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class Method:
    """Base of every method: its config fields are the dataclass fields, its name and stage class constants
    (set by `register`). Kinds below it say what a method does: `TokenReducer` (and `TokenMerger`) for the
    token stages, `KVScheme` for the kv stage, `WeightScheme` for the weights stage."""

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

    def as_idle(self) -> Method:
        """This method set to change nothing (the conformance tests hold it to bit-identical outputs)."""
        raise NotImplementedError


@dataclass(frozen=True)
class TokenReducer(Method):
    """A method that keeps a budget of each image's or video's tokens (`select` returns which).

    `keep` is the fraction of each image's or video's tokens that reach the LLM; `keep_tokens`, when given,
    is an absolute count per image or video and wins over `keep`. Counts round half up and never drop
    below one token: k = min(n, max(1, floor(keep * n + 0.5))). With `merge`, the dropped tokens are not
    thrown away: each is folded into the kept token it is most similar to, weighted by `importance`.

    ``keep="auto"`` (methods with importance scores, `scored`) sizes the budget per input, ZipVL's way: the
    fewest tokens whose scores cover a share `mass` of the span's total, held between the fractions
    `keep_min` and `keep_max` (rounded as above), so an input whose attention is concentrated keeps fewer.
    """

    keep: float | str = 0.5
    keep_tokens: int | None = None
    merge: bool = False
    mass: float = 0.9
    keep_min: float = 0.05
    keep_max: float = 1.0
    per_frame: bool = False

    scored: ClassVar[bool] = False
    """Whether `importance` gives scores at the method's stage (what ``keep="auto"`` spends)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if not isinstance(self.merge, bool):
            raise TypeError(f"{name}.merge must be True or False, got {self.merge!r}")
        if not isinstance(self.per_frame, bool):
            raise TypeError(f"{name}.per_frame must be True or False, got {self.per_frame!r}")
        if self.keep == "auto":
            self._check_auto()
        elif isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise TypeError(f"{name}.keep must be a number in (0, 1] or 'auto', got {self.keep!r}")
        elif not 0.0 < self.keep <= 1.0 or math.isnan(self.keep):
            raise ValueError(f"{name}.keep must be in (0, 1] or 'auto', got {self.keep!r}")
        elif (self.mass, self.keep_min, self.keep_max) != (0.9, 0.05, 1.0):
            raise ValueError(f"{name}: mass, keep_min and keep_max apply only with keep='auto', got keep={self.keep}")
        if self.keep_tokens is not None and not _whole(self.keep_tokens, 1):
            raise ValueError(f"{name}.keep_tokens must be an integer >= 1, got {self.keep_tokens!r}")

    def _check_auto(self) -> None:
        name = type(self).__name__
        if not self.scored:
            scored = sorted(n for n, m in METHODS.items() if issubclass(m, TokenReducer) and m.scored)
            raise ValueError(
                f"{name} has no importance scores to size keep='auto' by; methods that do: {', '.join(scored)}"
            )
        if self.keep_tokens is not None:
            raise ValueError(f"{name}: keep='auto' sizes the budget itself; leave keep_tokens unset")
        for field in ("mass", "keep_min", "keep_max"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name}.{field} must be a number in (0, 1], got {value!r}")
        if self.keep_min > self.keep_max:
            raise ValueError(
                f"{name}: keep_min={self.keep_min} is above keep_max={self.keep_max}; "
                "the bounds must satisfy 0 < keep_min <= keep_max <= 1"
            )

    def budget(self, n: int) -> int:
        """How many of a span's n tokens a fixed budget keeps."""
        if self.keep_tokens is not None:
            return min(n, self.keep_tokens)
        if self.keep == "auto":
            raise ValueError(f"{type(self).__name__}(keep='auto') has no fixed budget: it depends on the input")
        return _count(self.keep, n)

    def count(self, tokens: VisionTokens) -> int:
        """How many of the span's tokens to keep: the fixed `budget`, or with ``keep="auto"`` the fewest whose
        importance covers `mass` of the total, within the bounds."""
        n = len(tokens.span)
        if self.keep != "auto":
            return self.budget(n)
        scores = self.importance(tokens)
        if scores is None:
            raise RuntimeError(f"{type(self).__name__}(keep='auto') got no importance scores at its stage")
        share = scores.float().sort(descending=True).values.cumsum(0) / scores.float().sum().clamp_min(1e-12)
        k = int((share < self.mass).sum()) + 1
        return min(max(k, _count(self.keep_min, n)), _count(self.keep_max, n))

    @classmethod
    def example(cls) -> TokenReducer:
        return cls(keep=0.25)

    @property
    def idle(self) -> bool:
        return self.keep_tokens is None and self.keep == 1.0

    def as_idle(self) -> TokenReducer:
        return dataclasses.replace(self, keep=1.0, keep_tokens=None, mass=0.9, keep_min=0.05, keep_max=1.0)

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        """Return the ascending indices (into the span) of the k tokens to keep."""
        raise NotImplementedError

    def importance(self, tokens: VisionTokens) -> torch.Tensor | None:
        """(n,) how much each token weighs in a merged mean: the method's own score where it has one (by
        default the stage's attention scores), None for uniform."""
        return tokens.scores

    def pick(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        """The k tokens the stage keeps: `select` over the span, or with `per_frame` over each temporal slot of
        a video, the budget spread evenly over the slots that do not repeat an earlier one (`frame_budgets`),
        so no frame loses all its tokens unless it duplicates a kept one (with k at least the distinct slots)."""
        budgets = frame_budgets(tokens, k) if self.per_frame else None
        if budgets is None:
            return self.select(tokens, k, generator)
        per = len(tokens.span) // len(budgets)
        kept = [
            self.select(slot_tokens(tokens, slot, per), budget, generator) + slot * per
            for slot, budget in enumerate(budgets)
            if budget
        ]
        return torch.cat(kept).sort().values

    def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
        """What reaches the LLM with `merge` on: the k picked slots, each carrying the `importance`-weighted
        mean of itself and the dropped tokens most similar to it."""
        return fold_into_kept(tokens.embeds, self.pick(tokens, k, generator), self.importance(tokens))


class ByTowerAttention:
    """Mixin of reducers ranked by the attention each token receives in the vision tower (the encoder signal):
    they ask the pre_llm stage for it, and it is their importance (what ``keep="auto"`` and merged means weigh)."""

    needs_encoder_attention: ClassVar[bool] = True
    scored: ClassVar[bool] = True

    def importance(self, tokens: VisionTokens) -> torch.Tensor | None:
        return tokens.encoder_scores


@dataclass(frozen=True)
class TokenMerger(TokenReducer):
    """A token reducer that always merges by its own rule: `fold` says which k slots survive, the rows they
    carry (e.g. the mean of their group) and which slot each token went into."""

    merge: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.merge:
            raise ValueError(f"{type(self).__name__} always merges; merge=False is not a setting of it")
        if self.per_frame:
            raise ValueError(
                f"{type(self).__name__} merges by its own rule across the span; per_frame is not a setting of it"
            )

    def fold(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> Merge:
        raise NotImplementedError

    def select(self, tokens: VisionTokens, k: int, generator: torch.Generator) -> torch.Tensor:
        return self.fold(tokens, k, generator).index


@dataclass(frozen=True)
class EncoderMerger(TokenMerger):
    """A token merger of the encoder stage. Where the family's tower lets tokred merge between its blocks, the
    stage calls `reduce` after each block, with that block's keys as the metric, and at the tower's output;
    elsewhere it folds the tower's output tokens (`fold`) as the pre_llm stage would."""

    def reduce(
        self, x: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, k: int, protect_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Merge each sample's (N, d) tokens of a (B, N, d) batch down to k, by `metric` (B, N, m), each token
        weighing its `sizes` (B, N); `protect_first` keeps token 0 ([CLS]) apart. Returns the (B, k, d) tokens,
        their sizes, (B, N) the slot each token went into and (B, k) the index of each slot's surviving token."""
        raise NotImplementedError


@dataclass(frozen=True)
class LLMReducer(TokenReducer):
    """A token reducer of the llm stage: it cuts after each of its `cuts` (LLM layer indices, ascending),
    scoring the tokens as that layer saw them. Most cut once, after their field `layer`."""

    needs_text_attention: ClassVar[bool] = False
    """Whether it reads `VisionTokens.text_attention` (every text token's attention; costlier than the last's)."""

    def cuts(self, depth: int) -> tuple[int, ...]:
        """The layers after which it cuts, in an LLM of `depth` layers."""
        return (self.layer,)

    def count_at(self, progress: float, tokens: VisionTokens, entered: int) -> int:
        """How many of the span's tokens a cut keeps: `progress` is the share of the method's cuts done with
        this one (1 at the last), `entered` how many tokens the span had when the llm stage began. One cut:
        `count`."""
        return self.count(tokens)


def _whole(value: object, least: int) -> bool:
    """Whether `value` is an integer (not a bool) of at least `least`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_layer(method: Method, field: str, value: object) -> None:
    """ValueError unless `value` (the method's `field`) is an LLM layer index: an integer >= 0."""
    if not _whole(value, 0):
        raise ValueError(f"{type(method).__name__}.{field} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class FrameFilter(Method):
    """A method of the frames stage: which of a video's patch groups the vision tower encodes at all. It sees
    each video as (t, m, d) groups (t temporal slots, m locations, one row of normalised pixels per LLM token)
    and returns (t, m) bool, True where the group is encoded; the stage runs the tower on those alone and
    drops the rest before the LLM."""

    def encodes(self, groups: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class KVScheme(Method):
    """How the KV cache stores keys and values; the kv stage generates with the cache `make_cache` returns."""

    def make_cache(self, config: Any) -> Any:
        """A transformers Cache for a model with this text config."""
        raise NotImplementedError


@dataclass(frozen=True)
class GroupedKV(KVScheme):
    """A KV scheme that stores keys and values group-wise quantized (`tokred.kv.QuantizedKVCache`): `bits` a code,
    a float16 scale and zero per `group` (None: a head's channels), the newest `residual` tokens exact. bits=16
    quantizes nothing: the cache then holds what the model's own would, so the scheme is idle."""

    bits: int = 8
    group: int | None = None
    residual: int = 0

    widths: ClassVar[tuple[int, ...]]
    """The code widths the scheme allows (16, the idle setting, besides)."""
    key_axis: ClassVar[str]
    value_axis: ClassVar[str]

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.bits, bool) or self.bits not in (*self.widths, FULL):
            allowed = ", ".join(map(str, self.widths))
            raise ValueError(f"{name}.bits must be one of {allowed} (or {FULL}: not quantized), got {self.bits!r}")
        if self.group is not None and not _whole(self.group, 1):
            raise ValueError(f"{name}.group must be an integer >= 1 (or None: a head's channels), got {self.group!r}")
        if not _whole(self.residual, 0):
            raise ValueError(f"{name}.residual must be an integer >= 0 (tokens kept exact), got {self.residual!r}")

    @property
    def idle(self) -> bool:
        return self.bits == FULL

    def as_idle(self) -> GroupedKV:
        return dataclasses.replace(self, bits=FULL)

    def make_cache(self, config: Any) -> QuantizedKVCache:
        return QuantizedKVCache.grouped(config, self.bits, self.key_axis, self.value_axis, self.group, self.residual)


@dataclass(frozen=True)
class WeightScheme(Method):
    """Bit widths for the LLM's linear layers; the weights stage quantizes each to its width at patch time."""

    def bit_map(self, model: nn.Module) -> dict[str, int]:
        """Qualified name of each linear layer to quantize -> its bit width."""
        raise NotImplementedError


def frame_budgets(tokens: VisionTokens, k: int) -> list[int] | None:
    """Per temporal slot of a video span, its share of k: even over the slots whose tokens are not all equal to
    an earlier slot's (a repeated frame gets 0), the remainder to the earlier ones, at most a slot's tokens;
    None for an image or a one-slot video. A video whose tokens do not form a known grid is refused."""
    grid, n = tokens.span.grid, len(tokens.span)
    if tokens.span.kind != "video" or (grid is not None and grid[0] == 1):
        return None
    if grid is None or grid[0] * grid[1] * grid[2] != n:
        raise ValueError(
            f"per_frame needs each video's (t, h, w) token grid; this video's {n} tokens come with {grid} "
            "(the Qwen families give it; LLaVA-OneVision's pooled frames do not)"
        )
    t, per = grid[0], n // grid[0]
    frames = tokens.embeds.view(t, per, -1)
    distinct = [s for s in range(t) if not any(torch.equal(frames[s], frames[r]) for r in range(s))]
    budgets = [0] * t
    left = k
    while left:  # round-robin over the distinct slots that still have room
        open_slots = [s for s in distinct if budgets[s] < per] or [s for s in range(t) if budgets[s] < per]
        for s in open_slots[:left]:
            budgets[s] += 1
        left -= min(left, len(open_slots))
    return budgets


def slot_tokens(tokens: VisionTokens, slot: int, per: int) -> VisionTokens:
    """One temporal slot of a video span's tokens, as a one-frame span (a grid of t = 1)."""
    rows = slice(slot * per, (slot + 1) * per)
    span = tokens.span
    grid = None if span.grid is None else (1, span.grid[1], span.grid[2])
    cut = {
        f: getattr(tokens, f)[rows]
        for f in ("embeds", "scores", "key_norms", "encoder_scores")
        if getattr(tokens, f) is not None
    }
    if tokens.text_attention is not None:
        cut["text_attention"] = tokens.text_attention[:, rows]
    return dataclasses.replace(tokens, span=dataclasses.replace(span, positions=span.positions[rows], grid=grid), **cut)


def _count(fraction: float, n: int) -> int:
    """A fraction of n tokens, rounded half up, at least one."""
    return min(n, max(1, math.floor(fraction * n + 0.5)))


KINDS: dict[str, type[Method]] = {
    "frames": FrameFilter,
    "pre_llm": TokenReducer,
    "encoder": EncoderMerger,
    "llm": LLMReducer,
    "kv": KVScheme,
    "weights": WeightScheme,
}
"""Stage -> the kind its methods must be."""


def register(name: str, stage: str):
    """Class decorator: record a method under `name` for `stage`."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")

    def wrap(cls: type[Method]) -> type[Method]:
        if not issubclass(cls, KINDS[stage]):
            raise TypeError(f"a method for stage {stage!r} must be a {KINDS[stage].__name__}, not {cls.__name__}")
        cls.name, cls.stage = name, stage
        METHODS[name] = cls
        return cls

    return wrap
