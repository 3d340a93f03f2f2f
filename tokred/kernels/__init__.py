"""Kernels for tokred's hot paths: each op a torch reference beside a Triton kernel, and a dispatcher between."""

from tokred.kernels.dispatch import BACKENDS
from tokred.kernels.last_query import (
    last_query_attention,
    last_query_attention_reference,
    last_query_attention_triton,
)
from tokred.kernels.rows_attention import rows_attention

__all__ = [
    "BACKENDS",
    "last_query_attention",
    "last_query_attention_reference",
    "last_query_attention_triton",
    "rows_attention",
]
