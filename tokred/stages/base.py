"""The Stage protocol and the registry from stage name to runtime.

A stage runtime lives as long as the patch: it holds its method, the adapter, and a way to reach the call in
flight. Everything about one call lives in that `Call`, so a stage object carries no per-call state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from tokred.adapters.base import Adapter
from tokred.methods.base import Method
from tokred.stages.call import Call

RUNTIMES: dict[str, type[Stage]] = {}
"""Stage name -> its runtime; `Session` builds one per configured method, in pipeline order."""


class Stage:
    """One stage's runtime. Subclasses set `name`, validate in `__init__` and override what they use."""

    name: ClassVar[str]

    def __init__(self, method: Method, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        self.method, self.adapter, self.current = method, adapter, current

    def install(self) -> list[Callable[[], None]]:
        """Hooks this stage needs beyond the session's own; returns their undo callbacks."""
        return []

    def generate(self, kwargs: dict[str, Any]) -> None:
        """A generate() call starts: adjust its keyword arguments (the kv stage passes its cache)."""

    def prefill(self, call: Call) -> None:
        """A call starting from an empty cache that holds vision tokens: choose and cut (or arm for later)."""

    def decode(self, call: Call) -> None:
        """A decode step of `call`: carry this stage's cut into it."""


def runtime(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register `cls` as the runtime of stage `cls.name`."""
    RUNTIMES[cls.name] = cls
    return cls
