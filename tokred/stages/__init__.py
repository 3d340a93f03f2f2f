"""The stage runtimes, registered by name (`stages.base.RUNTIMES`), and the Session that walks them.

Each built stage is one module here; importing this package registers them all. A new stage is a new
module with a `@runtime` class and its import line below.
"""

from tokred.stages import encoder, frames, kv, llm, pre_llm, weights  # noqa: F401  (registers the runtimes)
