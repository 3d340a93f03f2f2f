"""The kv stage: every generate() call stores its keys and values in the scheme's cache, unless the caller passes one.

Nothing runs inside the model: the cache's `update` quantizes and returns what the attention reads. The scheme
builds one cache at patch time, so settings the model cannot take (a group that does not divide its head dim)
are refused by `patch()`, not in the middle of generate().
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.methods.base import KVScheme
from tokred.stages.base import Stage, runtime
from tokred.stages.call import Call


@runtime
class KVStage(Stage):
    name = "kv"

    def __init__(self, method: KVScheme, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        super().__init__(method, adapter, current)
        method.make_cache(adapter.text_config)
        self.cache_name = compat.cache_argument(adapter.model)

    def generate(self, kwargs: dict[str, Any]) -> None:
        """Pass a fresh cache of the scheme, unless the call brings its own, asks for a cache implementation
        or for none."""
        config = kwargs.get("generation_config") or self.adapter.model.generation_config
        if compat.passed_cache(kwargs, self.cache_name) is not None or kwargs.get("cache_implementation"):
            return
        if kwargs.get("use_cache", config.use_cache) is False:  # None: generate's default, a cache
            return
        kwargs[self.cache_name] = self.method.make_cache(self.adapter.text_config)
