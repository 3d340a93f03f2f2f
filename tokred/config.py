"""`Config`, its text form, the presets, and turning whatever a user passes to `patch` into a validated Config.

The text form is what `patch(model, "...")`, `tokred eval --recipes`, the lmms-eval plugin's ``recipe=`` and
the demo all take: a preset name, or methods joined by ``+``, each a method name followed by ``:field=value``
for every field that differs from its default, e.g. ``fastv:layer=3:keep=0.25+random:keep=0.5``. It holds no
commas or spaces, so it passes through lmms-eval's comma-separated ``--model_args`` and a shell unquoted.
``str(config)`` prints it; `Config.parse` reads it back (round-trip tested).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokred.methods import METHODS, STAGES, FastV, KVScheme, Method, Random, WeightScheme


@dataclass(frozen=True)
class Config:
    """A recipe: at most one method per stage. `prune` takes the token reducers (one or a sequence), `kv` a
    KV scheme and `weights` a weight scheme; `prune` may also hold all of them as one list. Methods are kept
    in pipeline order, so equal recipes compare equal. Its text form: `str(config)`, read back by `parse`."""

    prune: Method | Sequence[Method] = ()
    kv: KVScheme | None = None
    weights: WeightScheme | None = None
    methods: dict[str, Method] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = (self.prune,) if isinstance(self.prune, Method) else self.prune
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise TypeError(f"Config.prune takes a method or a sequence of methods, got {self.prune!r}")
        for name in ("kv", "weights"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Method) or value.stage != name):
                raise TypeError(f"Config.{name} takes a method of stage {name!r} (or None), got {value!r}")
        by_stage: dict[str, Method] = {}
        for method in (*given, *(m for m in (self.kv, self.weights) if m is not None)):
            if not isinstance(method, Method):
                raise TypeError(
                    f"Config.prune items must be method configs ({', '.join(sorted(METHODS))}), got {method!r}"
                )
            if method.stage in by_stage:
                raise ValueError(
                    f"two methods for stage {method.stage!r}: {by_stage[method.stage]!r} and {method!r}; "
                    "a Config takes at most one method per stage"
                )
            by_stage[method.stage] = method
        methods = {s: by_stage[s] for s in STAGES if s in by_stage}
        _check_tower_readers(methods)
        _check_decode_pruning(methods)
        object.__setattr__(self, "prune", tuple(m for s, m in methods.items() if s not in ("kv", "weights")))
        object.__setattr__(self, "kv", methods.get("kv"))
        object.__setattr__(self, "weights", methods.get("weights"))
        object.__setattr__(self, "methods", methods)

    def __str__(self) -> str:
        return "+".join(_method_text(m) for m in self.methods.values()) or "none"

    @classmethod
    def parse(cls, text: str) -> Config:
        """A Config from its text form or a preset name; ValueError naming what exists for an unknown
        preset, method or field, or a malformed value."""
        if text in PRESETS:
            return PRESETS[text]
        return cls(prune=[_parse_method(part) for part in text.split("+")])

    def with_schemes(self, kv: str = "none", weights: str = "none") -> Config:
        """This recipe plus a KV scheme and a weight scheme given as text (``none``: leave that stage as it is);
        ValueError listing the schemes for an unknown one."""
        given = {"kv": kv, "weights": weights}
        added = {stage: _parse_method(text, stage) for stage, text in given.items() if text != "none"}
        return dataclasses.replace(self, **added) if added else self


def _check_tower_readers(methods: dict[str, Method]) -> None:
    """A frames method leaves the tower only a video's kept patches: refuse methods that read or merge inside
    the tower alongside it (their signal would cover those patches alone)."""
    frames = methods.get("frames")
    if frames is None or frames.idle:
        return
    readers = [m for s, m in methods.items() if s == "encoder" or getattr(m, "needs_encoder_attention", False)]
    if readers:
        raise ValueError(
            f"{frames.name} runs the vision tower on a video's changed patches only, so {readers[0].name} (which "
            "reads or merges inside the tower) cannot follow it; combine it with pre_llm or llm methods that do "
            "not read the tower"
        )


def _check_decode_pruning(methods: dict[str, Method]) -> None:
    """A pre_llm method that prunes the cache while decoding gathers each step's keys and values from every layer's
    whole cache: refuse an llm method beside it (the layers after its cut hold fewer tokens) and a kv scheme (whose
    decode attention reads its packed cache in place)."""
    first = methods.get("pre_llm")
    if not getattr(first, "prunes_decode", False):
        return
    for stage, what in (("llm", "cuts the cache inside the LLM"), ("kv", "reads its quantized cache in place")):
        other = methods.get(stage)
        if other is not None and not other.idle:
            raise ValueError(
                f"{first.name} with decode pruning (decode_keep < 1) gathers every layer's keys and values from its "
                f"whole cache at each decode step, so {other.name} (which {what}) cannot go with it; use one or "
                "the other"
            )


def _method_text(method: Method) -> str:
    defaults = type(method)()
    changed = [
        f":{f.name}={_text(getattr(method, f.name))}"
        for f in dataclasses.fields(method)
        if getattr(method, f.name) != getattr(defaults, f.name)
    ]
    return method.name + "".join(changed)


def _parse_method(text: str, stage: str | None = None) -> Method:
    """One method from ``name:field=value:...``; with `stage` ("kv" or "weights") only that stage's schemes."""
    name, *assignments = text.split(":")
    if stage is not None and name not in schemes(stage)[1:]:
        raise ValueError(f"unknown {stage} scheme {text!r}; {_listing(stage)}")
    if name not in METHODS:
        raise ValueError(
            f"unknown preset or method {name!r} in recipe {text!r}; presets are: {', '.join(PRESETS)}; "
            f"methods are: {', '.join(sorted(METHODS))} (written name:field=value:..., joined by +)"
        )
    method = METHODS[name]
    fields = {f.name: f for f in dataclasses.fields(method)}
    values = {}
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if key not in fields or not equals:
            raise ValueError(f"{name} has no field {key!r} (in {text!r}); its fields are: {', '.join(fields)}")
        values[key] = _value(value, tuples="tuple" in str(fields[key].type))
    return method(**values)


def _text(value: object) -> str:
    """A field value as the text form writes it: a tuple as its items joined by ``/``."""
    return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _value(text: str, tuples: bool = False) -> bool | int | float | None | str | tuple:
    """A field value as written: ``True``/``False``, an integer, a number, ``None``, for a field that holds a
    tuple items joined by ``/`` (a tuple of such values), else the text itself (a path keeps its slashes; the
    method validates it)."""
    if tuples and "/" in text:
        return tuple(_value(item) for item in text.split("/"))
    if text in _WORDS:
        return _WORDS[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_WORDS = {"None": None, "True": True, "False": False}


def schemes(stage: str) -> tuple[str, ...]:
    """``none`` and the methods registered for `stage` ("kv" or "weights") now, by name."""
    return ("none", *sorted(n for n, m in METHODS.items() if m.stage == stage))


def _listing(stage: str) -> str:
    return f"{stage} schemes are: {', '.join(schemes(stage))} (written name:field=value:...)"


KV_SCHEMES: tuple[str, ...] = schemes("kv")
"""KV-cache schemes a run may name (`tokred eval --kv`, the plugin's ``kv=``, the demo): tokred's registered ones."""
WEIGHT_BITS: tuple[str, ...] = schemes("weights")
"""Weight schemes a run may name, as for KV_SCHEMES."""


PRESETS: dict[str, Config] = {
    **{f"random-{p}": Config(prune=Random(keep=p / 100)) for p in (75, 50, 25, 10)},
    **{f"fastv-{p}": Config(prune=FastV(layer=2, keep=p / 100)) for p in (75, 50, 25, 10)},
    "none": Config(),
}


def resolve(config: Config | str | None, recommended: str) -> Config:
    """Turn patch()'s `config` argument into a Config (None: the family's `recommended` preset), with errors
    that list what is allowed."""
    if config is None:
        config = recommended
    if isinstance(config, str):
        return Config.parse(config)
    if isinstance(config, Method):
        return Config(prune=config)
    if not isinstance(config, Config):
        raise TypeError(
            f"patch() takes None, a preset name, a method config or a tokred.Config, got {type(config).__name__}"
        )
    return config
