"""Compression methods, one file each, registered by name with their stage."""

from tokred.methods.base import METHODS, STAGES, Method, TokenReducer
from tokred.methods.fastv import FastV
from tokred.methods.random import Random
from tokred.tokens import Span, VisionTokens

__all__ = ["METHODS", "STAGES", "FastV", "Method", "Random", "TokenReducer", "Span", "VisionTokens"]
