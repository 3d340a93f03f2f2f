"""Tiny offline VLM checkpoints (random weights) for tests and examples."""

from tokred.zoo.builders import FAMILIES, build

__all__ = ["FAMILIES", "build"]
