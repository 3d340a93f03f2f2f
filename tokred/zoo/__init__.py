"""Tiny offline VLM checkpoints (random weights) for tests and examples."""

from tokred.zoo.builders import FAMILIES, build
from tokred.zoo.checkpoints import available, card, load

__all__ = ["FAMILIES", "available", "build", "card", "load"]
