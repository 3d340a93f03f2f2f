"""Compression methods, one file each, registered by name with their stage."""

from tokred.methods.base import (
    METHODS,
    STAGES,
    EncoderMerger,
    FrameFilter,
    GroupedKV,
    KVScheme,
    LLMReducer,
    Method,
    TokenMerger,
    TokenReducer,
    WeightScheme,
)
from tokred.methods.cdpruner import CDPruner
from tokred.methods.dart import DART
from tokred.methods.divprune import DivPrune
from tokred.methods.dycoke import DyCoke
from tokred.methods.fastv import FastV
from tokred.methods.fastvid import FastVID
from tokred.methods.int8 import Int8
from tokred.methods.kivi import KIVI
from tokred.methods.layerbits import LayerBits, UniformBits
from tokred.methods.mustdrop import MustDrop
from tokred.methods.pdrop import PyramidDrop
from tokred.methods.random import Random
from tokred.methods.sparsevlm import SparseVLM
from tokred.methods.temporal_dedup import TemporalDedup
from tokred.methods.tome import ToMe
from tokred.methods.vidcom2 import VidCom2
from tokred.methods.vidkv import VidKV
from tokred.methods.visionzip import VisionZip
from tokred.methods.vispruner import VisPruner
from tokred.tokens import Span, VisionTokens

__all__ = [
    "DART",
    "METHODS",
    "STAGES",
    "CDPruner",
    "DivPrune",
    "DyCoke",
    "FastV",
    "FastVID",
    "EncoderMerger",
    "FrameFilter",
    "GroupedKV",
    "Int8",
    "KIVI",
    "KVScheme",
    "LayerBits",
    "LLMReducer",
    "Method",
    "MustDrop",
    "PyramidDrop",
    "Random",
    "Span",
    "SparseVLM",
    "TemporalDedup",
    "ToMe",
    "TokenMerger",
    "TokenReducer",
    "UniformBits",
    "VidCom2",
    "VidKV",
    "VisionTokens",
    "VisionZip",
    "VisPruner",
    "WeightScheme",
]
