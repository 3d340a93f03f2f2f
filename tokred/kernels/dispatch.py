"""Backend choice for tokred's kernels: the Triton kernel where it can run, the torch reference elsewhere.

Triton runs kernels compiled on a CUDA GPU, or on the CPU in its interpreter when TRITON_INTERPRET=1. Triton
reads that variable when it is first imported (and `@triton.jit` when each kernel is defined), so it must be
set before anything imports triton (transformers does): tests/conftest.py sets it when there is no GPU, and
benchmarks/kernels.py before importing tokred. Setting it later has no effect, so it is read here only once.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # triton is Linux-only; the torch references need none of it
    triton = None

BACKENDS = ("auto", "triton", "torch")

# Read once, at import, as triton does at its own first import: 1, true or on (any case), the spellings that
# every supported triton takes for true.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asked for triton's CPU interpreter when this process imported tokred.kernels."""
    return _INTERPRET


def triton_unavailable(*tensors: torch.Tensor) -> str | None:
    """Why a Triton kernel cannot run on these tensors, or None when it can."""
    if triton is None:
        return "triton is not installed"
    if interpreting() or all(t.is_cuda for t in tensors):
        return None
    devices = sorted({str(t.device) for t in tensors})
    return (
        f"tensors on {', '.join(devices)}: triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton's "
        "first import for its CPU interpreter"
    )


def resolve(backend: str, *tensors: torch.Tensor) -> str:
    """'triton' or 'torch': `backend` ('auto' picks triton where it can run) checked against these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return backend
    reason = triton_unavailable(*tensors)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    return "torch"
