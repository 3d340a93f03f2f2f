"""The runtime of each stage and the Session that wires them into a model."""

BUILT: tuple[str, ...] = ("pre_llm", "llm")
"""Stages with a runtime, in pipeline order; `patch()` refuses a method registered for any other stage."""
