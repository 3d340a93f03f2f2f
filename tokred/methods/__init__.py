"""Compression methods, one file each, registered by name with their stage."""

from tokred.methods.base import METHODS, STAGES, KVScheme, Method, TokenMerger, TokenReducer, WeightScheme
from tokred.methods.fastv import FastV
from tokred.methods.random import Random
from tokred.tokens import Span, VisionTokens

__all__ = [
    "METHODS",
    "STAGES",
    "FastV",
    "KVScheme",
    "Method",
    "Random",
    "Span",
    "TokenMerger",
    "TokenReducer",
    "VisionTokens",
    "WeightScheme",
]
