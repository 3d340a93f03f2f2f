"""Compression methods, one file each, registered by name with their stage."""

from tokred.methods.base import METHODS, STAGES, Method, Span, VisionTokens
from tokred.methods.fastv import FastV
from tokred.methods.random import Random

__all__ = ["METHODS", "STAGES", "FastV", "Method", "Random", "Span", "VisionTokens"]
