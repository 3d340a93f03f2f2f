"""tokred.kernels.dequant_matmul: the GEMV and GEMM kernels against the torch reference, for every weight width.

Kernels run compiled on a CUDA GPU or in triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
without a GPU), so the shapes are tiny; block sizes are passed small to get several tiles, a ragged last K
block, split-K chunks and both ways of reading scales (per element, or one per output when a K block lies in
one group).
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import compile_for_hopper

from tokred.kernels import dequant_matmul as dm
from tokred.kernels import dispatch
from tokred.kernels.dequant_matmul import (
    dequant_matmul,
    dequant_matmul_reference,
    dequant_matmul_triton,
    gemm_triton,
    gemv_triton,
)
from tokred.weights import WEIGHT_WIDTHS, QuantizedWeight, dequantize_weight, quantize_weight

INTERPRETED = dispatch.interpreting()
DEVICE = "cpu" if INTERPRETED else "cuda"  # where the kernels run in this process, if anywhere
needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="needs triton")
needs_kernel = pytest.mark.skipif(
    dispatch.triton is None or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 for its CPU interpreter, set before triton's first "
    "import (tests/conftest.py sets it without a GPU, unless TRITON_INTERPRET is already set, e.g. to 0)",
)
# float32: both sides sum float32 products of the same levels, in other orders. float16 / bfloat16: the kernel
# rounds the dequantized tile to x's dtype for the tensor cores and both round the output once.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2},
}
# (in_features, group, block_k): a ragged last K block with scales read per element (84 is no multiple of 8,
# so the 3-bit stream ends mid-byte), and K blocks inside groups of 64 with one scale per output
SHAPES = [(84, 28, 32), (128, 64, 32)]
OUT = 40  # three 16-wide output tiles, the last one ragged


def make(in_features: int, group: int, bits: int, rows: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """x (rows, in), a quantized (OUT, in) weight and a bias on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, in_features, generator=g)
    q = quantize_weight(w, bits, group)
    q = QuantizedWeight(*(t.to(DEVICE) for t in (q.packed, q.scale, q.zero)), q.bits, q.group, q.shape)
    x = torch.randn(rows, in_features, generator=g).to(DEVICE, dtype)
    return x, q, torch.randn(OUT, generator=g).to(DEVICE)


def test_reference_is_the_dequantized_linear():
    x, q, bias = make(84, 28, 3, 5)
    w = dequantize_weight(q)
    want = F.linear(x.double(), w.double(), bias.double()).float()
    torch.testing.assert_close(dequant_matmul_reference(x, q, bias), want, rtol=1e-6, atol=1e-5)
    half = dequant_matmul_reference(x.half(), q)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, F.linear(x.half().float(), w).half())


@needs_kernel
@pytest.mark.parametrize("bits", WEIGHT_WIDTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=["ragged-k", "k-in-group"])
def test_gemv_matches_reference(bits, shape):
    in_features, group, block_k = shape
    x, q, bias = make(in_features, group, bits, 3)
    want = dequant_matmul_reference(x, q, bias)
    for splits in (1, 3):  # one chunk (bias and dtype in the kernel), and split-K partial sums
        got = gemv_triton(x, q, bias, block_n=16, block_k=block_k, splits=splits)
        torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])
    got = gemv_triton(x, q, None, block_n=16, block_k=block_k, splits=1)
    torch.testing.assert_close(got, dequant_matmul_reference(x, q), **TOLERANCE[torch.float32])


@needs_kernel
@pytest.mark.parametrize("bits", WEIGHT_WIDTHS)
@pytest.mark.parametrize("shape", SHAPES, ids=["ragged-k", "k-in-group"])
def test_gemm_matches_reference(bits, shape):
    in_features, group, block_k = shape
    x, q, bias = make(in_features, group, bits, 20)  # two 16-row tiles, the last ragged
    got = gemm_triton(x, q, bias, block_m=16, block_n=16, block_k=block_k, num_warps=4, num_stages=1)
    torch.testing.assert_close(got, dequant_matmul_reference(x, q, bias), **TOLERANCE[torch.float32])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_give_their_dtype(dtype):
    x, q, bias = make(84, 28, 4, 20, dtype)
    want = dequant_matmul_reference(x, q, bias)
    for got in (gemv_triton(x[:2], q, bias, block_n=16, block_k=32, splits=2), gemm_triton(x, q, bias, block_m=16)):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want[: len(got)], **TOLERANCE[dtype])


@needs_kernel
@pytest.mark.parametrize("rows", [2, 9], ids=["gemv", "gemm"])
def test_batch_dims_and_the_path_by_rows(monkeypatch, rows):
    """(2, rows, in) -> (2, rows, out); at most GEMV_ROWS rows in all take the GEMV kernel, more the GEMM one."""
    x, q, bias = make(84, 28, 2, 2 * rows)
    x = x.reshape(2, rows, 84)
    calls: list[str] = []
    for name in ("gemv_triton", "gemm_triton"):
        kernel = getattr(dm, name)
        monkeypatch.setattr(dm, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    got = dequant_matmul(x, q, bias)
    assert got.shape == (2, rows, OUT)
    assert calls == ["gemv_triton" if 2 * rows <= dm.GEMV_ROWS else "gemm_triton"]
    torch.testing.assert_close(got, dequant_matmul_reference(x, q, bias), **TOLERANCE[torch.float32])


@needs_kernel
def test_other_float_dtypes_and_empty_batches():
    x, q, bias = make(84, 28, 8, 2)
    got = dequant_matmul_triton(x.double(), q, bias)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, dequant_matmul_reference(x.double(), q, bias), **TOLERANCE[torch.float32])
    empty = dequant_matmul_triton(x[:0].reshape(0, 0, 84), q, bias)
    assert empty.shape == (0, 0, OUT)


def test_backend_choice(monkeypatch):
    x, q, bias = make(84, 28, 4, 2)
    assert torch.equal(dequant_matmul(x, q, bias, backend="torch"), dequant_matmul_reference(x, q, bias))
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)  # as if triton had been imported without it
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
            dequant_matmul(x, q, bias, backend="triton")
        assert torch.equal(dequant_matmul(x, q, bias), dequant_matmul_reference(x, q, bias))


def test_bad_operands():
    x, q, bias = make(84, 28, 4, 2)
    with pytest.raises(ValueError, match=r"in_features=84"):
        dequant_matmul(x[:, :80], q, backend="torch")
    with pytest.raises(ValueError, match=r"bias must be \(out_features,\) = \(40,\)"):
        dequant_matmul(x, q, bias[:3], backend="torch")
    with pytest.raises(TypeError, match="floating-point"):
        dequant_matmul(x.long(), q, backend="torch")


COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import inspect
    from unittest import mock

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from tokred.kernels import dequant_matmul as dm
    from tokred.weights import quantize_weight

    names = ("_gemv_kernel", "_gemm_kernel")
    kernels = {name: getattr(dm, name) for name in names}
    for bits, group in ((3, 32), (4, 128)):  # a code over two bytes, scales per element; one byte, per output
        q = quantize_weight(torch.randn(512, 1024), bits, group)
        for rows in (1, 300):
            x = torch.randn(rows, 1024, dtype=torch.bfloat16)
            with mock.patch.multiple(dm, **dict.fromkeys(names, mock.DEFAULT)) as launchers:
                dm.dequant_matmul_triton(x, q, torch.randn(512, dtype=torch.bfloat16))
            name = "_gemv_kernel" if rows <= dm.GEMV_ROWS else "_gemm_kernel"
            args, meta = launchers[name].__getitem__.return_value.call_args  # kernel[grid](*args, **meta)
            options = {key: meta.pop(key) for key in ("num_warps", "num_stages") if key in meta}
            params = [p for p in inspect.signature(kernels[name].fn).parameters if p not in meta]
            signature = dict(zip(params, map(mangle_type, args), strict=True)) | dict.fromkeys(meta, "constexpr")
            source = ASTSource(kernels[name], signature, meta)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            assert compiled.asm["cubin"], name
            print(name, bits, "compiled for sm_90")
    """
)


@needs_triton
def test_kernels_compile_for_hopper():
    """The compiled path builds to sm_90 binaries without a GPU (triton ships ptxas), as launched for bf16."""
    assert compile_for_hopper(COMPILE_FOR_HOPPER).count("compiled for sm_90") == 4
