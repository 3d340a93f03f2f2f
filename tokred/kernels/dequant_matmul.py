"""x @ W.T + b with W a group-wise quantized weight (`tokred.weights.QuantizedWeight`): Triton kernels beside
their torch reference, and the dispatcher between them.

The reference dequantizes W and multiplies in float32. The kernels never write a dequantized W: each reads a
(BLOCK_K, BLOCK_N) tile of packed codes, unpacks it in registers (a row of codes is a little-endian bit stream,
code k at bit k * bits, so a code is one byte or, for 3 bits, two bytes shifted and masked), applies each group's
float16 scale and zero, and multiplies, accumulating in float32.
GEMV (decode, at most GEMV_ROWS rows): a program per (row, BLOCK_N outputs, chunk of in_features) sums products
in registers; chunks (split-K, enough programs to fill the GPU) write float32 partial sums that torch adds up.
GEMM (prefill): a program per (BLOCK_M rows, BLOCK_N outputs) runs the K loop through tensor-core dots, in x's
dtype for float16 / bfloat16 x (the dequantized tile rounded to it) and in IEEE float32 for float32 x.
"""

from __future__ import annotations

import torch

from tokred.kernels.dispatch import interpreting, resolve, triton
from tokred.kernels.last_query import _default_splits
from tokred.weights.quant import QuantizedWeight, check_width, dequantize_weight

if triton is not None:
    import triton.language as tl

# At most this many rows (decode steps) take the GEMV path. It unpacks the weight once per row, the GEMM once per
# BLOCK_M rows but with fewer programs and no split-K: past a few rows the unpacking dominates (an estimate; not
# yet tuned on a GPU).
GEMV_ROWS = 4
DOT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # x dtypes the kernels take; others go through float32


def _check(x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None) -> None:
    """A ValueError unless x (..., in) and bias (out,) fit q's (out, in) weight."""
    check_width(q.bits, q.group, q.shape[1])
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != q.shape[1]:
        raise ValueError(
            f"x must be (..., in_features={q.shape[1]}) for a {tuple(q.shape)} weight, got {tuple(x.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (q.shape[0],):
        raise ValueError(f"bias must be (out_features,) = ({q.shape[0]},), got {tuple(bias.shape)}")


def dequant_matmul_reference(x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., out) in x's dtype: x (..., in) times q's dequantized weight, plus bias, in float32 (torch)."""
    _check(x, q, bias)
    y = x.float() @ dequantize_weight(q).to(x.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


if triton is not None:  # the kernels need triton to be defined; the reference above needs none of it

    @triton.jit
    def _weight_tile(
        packed_ptr,
        scale_ptr,
        zero_ptr,
        stride_pn,
        stride_pb,
        stride_sn,
        stride_sg,
        stride_zn,
        stride_zg,
        n_bytes,
        k,
        n,
        in_k,
        in_out,
        k_start,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """The float32 (k, n) tile of W.T: bits k * BITS onwards of row n's code stream, zero + code * scale."""
        inside = in_k[:, None] & in_out[None, :]
        bit = k * BITS
        byte = bit // 8
        shift = (bit % 8)[:, None]
        at = packed_ptr + n[None, :] * stride_pn
        code = tl.load(at + byte[:, None] * stride_pb, mask=inside, other=0).to(tl.int32)
        if (8 % BITS) != 0:  # 3 bits: a code at bit 6 or 7 of its byte runs into the next
            spill = inside & (shift > 8 - BITS) & (byte + 1 < n_bytes)[:, None]
            code |= tl.load(at + (byte + 1)[:, None] * stride_pb, mask=spill, other=0).to(tl.int32) << 8
        code = (code >> shift) & ((1 << BITS) - 1)
        if GROUP % BLOCK_K == 0:  # the tile lies in one group: a scale and zero per output
            g = k_start // GROUP
            s = tl.load(scale_ptr + n * stride_sn + g * stride_sg, mask=in_out, other=0.0)[None, :]
            z = tl.load(zero_ptr + n * stride_zn + g * stride_zg, mask=in_out, other=0.0)[None, :]
        else:
            g = (k // GROUP)[:, None]
            s = tl.load(scale_ptr + n[None, :] * stride_sn + g * stride_sg, mask=inside, other=0.0)
            z = tl.load(zero_ptr + n[None, :] * stride_zn + g * stride_zg, mask=inside, other=0.0)
        return code.to(tl.float32) * s.to(tl.float32) + z.to(tl.float32)

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        bias_ptr,
        out_ptr,
        n_out,
        n_in,
        n_bytes,
        chunk,
        stride_xm,
        stride_xk,
        stride_pn,
        stride_pb,
        stride_sn,
        stride_sg,
        stride_zn,
        stride_zg,
        stride_os,
        stride_om,
        HAS_BIAS: tl.constexpr,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One row, BLOCK_N outputs, one `chunk` of in_features: the partial dot products (bias on chunk 0)."""
        row = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        in_out = n < n_out
        acc = tl.zeros([BLOCK_N], tl.float32)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, n_in)
        for start in tl.range(lo, hi, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            in_k = k < hi
            w = _weight_tile(
                packed_ptr,
                scale_ptr,
                zero_ptr,
                stride_pn,
                stride_pb,
                stride_sn,
                stride_sg,
                stride_zn,
                stride_zg,
                n_bytes,
                k,
                n,
                in_k,
                in_out,
                start,
                BITS,
                GROUP,
                BLOCK_K,
            )
            xk = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=in_k, other=0.0).to(tl.float32)
            acc += tl.sum(w * xk[:, None], axis=0)
        if HAS_BIAS:  # added by chunk 0 alone
            acc += tl.load(bias_ptr + n, mask=in_out & (split == 0), other=0.0).to(tl.float32)
        tl.store(out_ptr + split * stride_os + row * stride_om + n, acc.to(out_ptr.dtype.element_ty), mask=in_out)

    @triton.jit
    def _gemm_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        bias_ptr,
        out_ptr,
        n_rows,
        n_out,
        n_in,
        n_bytes,
        stride_xm,
        stride_xk,
        stride_pn,
        stride_pb,
        stride_sn,
        stride_sg,
        stride_zn,
        stride_zg,
        stride_om,
        HAS_BIAS: tl.constexpr,
        DOT_FP32: tl.constexpr,
        BITS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """BLOCK_M rows by BLOCK_N outputs: the K loop unpacks a weight tile and multiplies it in."""
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_rows = m < n_rows
        in_out = n < n_out
        m = m.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start in tl.range(0, n_in, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            in_k = k < n_in
            w = _weight_tile(
                packed_ptr,
                scale_ptr,
                zero_ptr,
                stride_pn,
                stride_pb,
                stride_sn,
                stride_sg,
                stride_zn,
                stride_zg,
                n_bytes,
                k,
                n,
                in_k,
                in_out,
                start,
                BITS,
                GROUP,
                BLOCK_K,
            )
            xs = tl.load(
                x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                mask=in_rows[:, None] & in_k[None, :],
                other=0.0,
            )
            if DOT_FP32:
                acc += tl.dot(xs.to(tl.float32), w, input_precision="ieee")
            else:
                acc += tl.dot(xs, w.to(xs.dtype))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=in_out, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + m[:, None] * stride_om + n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_rows[:, None] & in_out[None, :])


def _weight_args(q: QuantizedWeight) -> tuple[tuple[torch.Tensor, ...], list[int]]:
    """The packed codes, scales and zeros, and their strides, as the kernels take them."""
    tensors = (q.packed, q.scale, q.zero)
    return tensors, [stride for t in tensors for stride in t.stride()]


def gemv_triton(
    x: torch.Tensor,
    q: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 64,
    block_k: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """(m, out) in x's dtype for a 2-D x (m, in): the GEMV kernel, a program per row, `block_n` outputs and chunk
    of in_features (`splits` chunks of a multiple of `block_k`; default: enough programs to fill the GPU)."""
    rows, n_in = x.shape
    n_out = q.shape[0]
    n_tiles = triton.cdiv(n_out, block_n)
    splits = max(1, min(splits or _default_splits(x, rows * n_tiles), triton.cdiv(n_in, block_k)))
    chunk = triton.cdiv(triton.cdiv(n_in, splits), block_k) * block_k
    splits = max(1, triton.cdiv(n_in, chunk))
    out = torch.empty(splits, rows, n_out, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    tensors, strides = _weight_args(q)
    _gemv_kernel[(rows, n_tiles, splits)](
        x,
        *tensors,
        x if bias is None else bias,
        out,
        n_out,
        n_in,
        q.packed.shape[1],
        chunk,
        *x.stride(),
        *strides,
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        BITS=q.bits,
        GROUP=q.group,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)


def gemm_triton(
    x: torch.Tensor,
    q: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int = 64,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """(m, out) in x's dtype for a 2-D x (m, in): the GEMM kernel over tiles of `block_m` rows (default: up to
    128, as m needs) by `block_n` outputs (default: 128, or 64 for short tiles, to have more programs)."""
    rows, n_in = x.shape
    n_out = q.shape[0]
    block_m = block_m or min(128, max(16, triton.next_power_of_2(rows)))
    block_n = block_n or (128 if block_m > 32 else 64)
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    tensors, strides = _weight_args(q)
    _gemm_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n_out, block_n))](
        x,
        *tensors,
        x if bias is None else bias,
        out,
        rows,
        n_out,
        n_in,
        q.packed.shape[1],
        *x.stride(),
        *strides,
        out.stride(0),
        HAS_BIAS=bias is not None,
        DOT_FP32=x.dtype == torch.float32 or interpreting(),  # the interpreter's bf16 dot is wrong
        BITS=q.bits,
        GROUP=q.group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def dequant_matmul_triton(x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(..., out) like the reference, by the Triton kernels: GEMV for at most GEMV_ROWS rows, else GEMM."""
    _check(x, q, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype not in DOT_DTYPES:
        x2 = x2.float()
    if x2.shape[0] == 0 or q.shape[0] == 0:  # an empty grid has no programs to launch
        out = x2.new_zeros(x2.shape[0], q.shape[0])
    else:
        out = (gemv_triton if x2.shape[0] <= GEMV_ROWS else gemm_triton)(x2, q, bias)
    return out.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


def dequant_matmul(
    x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """x (..., in) @ dequantized(q).T + bias, (..., out) in x's dtype: the Triton kernels where they run, else the
    torch reference. backend: "auto", "triton" (an error where it cannot run) or "torch"."""
    if resolve(backend, x, q.packed) == "triton":
        return dequant_matmul_triton(x, q, bias)
    return dequant_matmul_reference(x, q, bias)
