"""tokred: fewer vision tokens, cheaper caches and lighter weights for transformers VLMs, in one line."""

from tokred.config import KV_SCHEMES, PRESETS, WEIGHT_BITS, Config
from tokred.methods import (
    DART,
    METHODS,
    CDPruner,
    DivPrune,
    DyCoke,
    FastV,
    FastVID,
    KVScheme,
    LLMReducer,
    Method,
    MustDrop,
    PyramidDrop,
    Random,
    SparseVLM,
    TokenMerger,
    TokenReducer,
    ToMe,
    VidCom2,
    VisionZip,
    VisPruner,
    WeightScheme,
)
from tokred.patch import patch, patched, stats, unpatch
from tokred.stats import Stats

__version__ = "0.1.0"

__all__ = [
    "KV_SCHEMES",
    "METHODS",
    "PRESETS",
    "WEIGHT_BITS",
    "DART",
    "CDPruner",
    "Config",
    "DivPrune",
    "DyCoke",
    "FastV",
    "FastVID",
    "KVScheme",
    "LLMReducer",
    "Method",
    "MustDrop",
    "PyramidDrop",
    "Random",
    "SparseVLM",
    "ToMe",
    "VidCom2",
    "TokenMerger",
    "TokenReducer",
    "VisionZip",
    "VisPruner",
    "WeightScheme",
    "Stats",
    "patch",
    "patched",
    "stats",
    "unpatch",
]
