"""`Config`, the presets, and turning whatever a user passes to `patch` into a validated Config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tokred.methods import METHODS, STAGES, FastV, Method, Random


@dataclass(frozen=True)
class Config:
    """A recipe: at most one method per stage. `prune` takes one method or a sequence of them."""

    prune: Method | Sequence[Method] = ()
    methods: dict[str, Method] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = (self.prune,) if isinstance(self.prune, Method) else self.prune
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise TypeError(f"Config.prune takes a method or a sequence of methods, got {self.prune!r}")
        by_stage: dict[str, Method] = {}
        for method in given:
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
        object.__setattr__(self, "prune", tuple(given))
        object.__setattr__(self, "methods", {s: by_stage[s] for s in STAGES if s in by_stage})


KV_SCHEMES: tuple[str, ...] = ("none",)
"""KV-cache schemes a run may name (`tokred eval --kv`, the plugin's ``kv=``, the demo); "none" until kv/ lands."""
WEIGHT_BITS: tuple[str, ...] = ("none",)
"""Weight bit allocations a run may name, as for KV_SCHEMES; "none" until weights/ lands."""

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
        if config in PRESETS:
            return PRESETS[config]
        if config in METHODS:
            return Config(prune=METHODS[config]())
        raise ValueError(
            f"unknown preset or method {config!r}; presets are: {', '.join(PRESETS)}; "
            f"methods (with their default settings) are: {', '.join(sorted(METHODS))}"
        )
    if isinstance(config, Method):
        return Config(prune=config)
    if not isinstance(config, Config):
        raise TypeError(
            f"patch() takes None, a preset name, a method config or a tokred.Config, got {type(config).__name__}"
        )
    return config
