"""Quantize-and-pack of KV blocks: Triton kernels beside their torch reference, `tokred.kv.quantize`, and the
dispatcher between them.

The kernels give the reference's bytes, scales and zeros exactly: the same float32 steps (IEEE division through
div_rn, rounding half to even), the zero rounded down and the scale up to float16 alike. Every width packs the
same way, as base-`levels` digits, so one kernel per grouping serves 1, 1.58 (ternary), 2, 4 and 8 bits.

axis="token" (values; the decode path's layout): a program takes BLOCK_R rows whole, finds each group of
channels' scale and zero, then packs each byte's codes. A byte may straddle two groups (a group that is not a
multiple of the per-byte count), so the packing pass reads the scales back from memory, after a barrier.
axis="channel" (keys): a program takes one group of tokens and BLOCK_B bytes' worth of channels; groups run
across tokens and bytes across channels, so it packs straight from the tile it reduced.
"""

from __future__ import annotations

import torch

from tokred.kernels.dispatch import resolve, triton
from tokred.kv.packing import per_byte
from tokred.kv.quant import Quantized, code_levels, group_dim, quantize

if triton is not None:
    import triton.language as tl

TILE = 4096  # elements a program holds in one tile


if triton is not None:  # the kernels need triton to be defined; the reference needs none of it

    @triton.jit
    def _to_half(v, STEP: tl.constexpr):
        """float32 v as the nearest float16 at or above it (STEP=1) or at or below it (STEP=-1), in float32."""
        h = v.to(tl.float16)
        off = h.to(tl.float32) < v if STEP > 0 else h.to(tl.float32) > v
        bits = h.to(tl.int16, bitcast=True).to(tl.int32)
        order = tl.where(bits < 0, -(bits & 0x7FFF), bits) + STEP  # float16 patterns as an ordered integer
        bits = tl.where(order < 0, -order - 32768, order)  # and back: a negative one sets the sign bit
        return tl.where(off, bits.to(tl.int16).to(tl.float16, bitcast=True), h).to(tl.float32)

    @triton.jit
    def _zero_scale(low, high, valid, LEVELS: tl.constexpr):
        """Each valid group's float16 zero (its min, rounded down) and scale (rounded up; 1 for a constant group)."""
        zero = _to_half(tl.where(valid, low, 0.0), -1)  # 0 where masked: no inf - inf to warn of
        scale = _to_half(tl.math.div_rn(tl.where(valid, high, 0.0) - zero, LEVELS - 1.0), 1)
        return zero, tl.where(scale == 0, 1.0, scale)

    @triton.jit
    def _packed(x, zero, scale, inside, lane, LEVELS: tl.constexpr, PER: tl.constexpr):
        """The bytes of a (..., byte, lane) tile of x: its codes as base-LEVELS digits, lane i worth LEVELS**i."""
        level = tl.minimum(tl.maximum(tl.math.div_rn(x - zero, scale), 0.0), LEVELS - 1.0)
        code = ((level + 8388608.0) - 8388608.0).to(tl.int32)  # 2**23 in and out: rounded half to even
        place = tl.full(lane.shape, 1, tl.int32)
        for i in tl.static_range(1, PER):
            place = tl.where(lane >= i, place * LEVELS, place)
        return tl.sum(tl.where(inside, code * place, 0), axis=2).to(tl.uint8)

    @triton.jit
    def _token_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        rows,
        dim,
        group,
        groups,
        n_bytes,
        stride_xr,
        stride_xd,
        LEVELS: tl.constexpr,
        PER: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """BLOCK_R rows: a scale and zero per group of `group` channels, then the codes packed PER to a byte."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = r < rows
        r = r.to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        e = tl.arange(0, BLOCK_E)
        channel = g[:, None] * group + e[None, :]  # (group, element of the group)
        inside = in_rows[:, None, None] & ((g < groups)[:, None] & (e < group)[None, :])[None]
        x = tl.load(x_ptr + r[:, None, None] * stride_xr + channel[None] * stride_xd, mask=inside, other=0.0)
        x = x.to(tl.float32)
        low = tl.min(tl.where(inside, x, float("inf")), axis=2)
        high = tl.max(tl.where(inside, x, float("-inf")), axis=2)
        kept = in_rows[:, None] & (g < groups)[None, :]
        zero, scale = _zero_scale(low, high, kept, LEVELS)
        stats = r[:, None] * groups + g[None, :]
        tl.store(zero_ptr + stats, zero.to(tl.float16), mask=kept)
        tl.store(scale_ptr + stats, scale.to(tl.float16), mask=kept)
        tl.debug_barrier()  # the packing pass reads scales and zeros that other threads stored

        b = tl.arange(0, BLOCK_B)
        lane = tl.arange(0, BLOCK_P)
        channel = b[:, None] * PER + lane[None, :]  # (byte, digit of the byte)
        inside = in_rows[:, None, None] & ((lane[None, :] < PER) & (channel < dim))[None]
        x = tl.load(x_ptr + r[:, None, None] * stride_xr + channel[None] * stride_xd, mask=inside, other=0.0)
        at = r[:, None, None] * groups + (channel // group)[None]
        zero = tl.load(zero_ptr + at, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + at, mask=inside, other=1.0).to(tl.float32)
        packed = _packed(x.to(tl.float32), zero, scale, inside, lane[None, None, :], LEVELS, PER)
        tl.store(packed_ptr + r[:, None] * n_bytes + b[None, :], packed, mask=in_rows[:, None] & (b < n_bytes)[None, :])

    @triton.jit
    def _channel_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        dim,
        group,
        n_bytes,
        stride_xr,
        stride_xd,
        LEVELS: tl.constexpr,
        PER: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """One group of `group` tokens and BLOCK_B bytes of channels: a scale and zero per channel, codes packed."""
        token_group = tl.program_id(0).to(tl.int64)
        t = tl.arange(0, BLOCK_T)
        in_group = t < group
        row = token_group * group + t
        b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        lane = tl.arange(0, BLOCK_P)
        channel = b[:, None] * PER + lane[None, :]  # (byte, digit of the byte)
        in_channel = (lane[None, :] < PER) & (channel < dim)
        inside = in_group[:, None, None] & in_channel[None]
        x = tl.load(x_ptr + row[:, None, None] * stride_xr + channel[None] * stride_xd, mask=inside, other=0.0)
        x = x.to(tl.float32)
        low = tl.min(tl.where(inside, x, float("inf")), axis=0)
        high = tl.max(tl.where(inside, x, float("-inf")), axis=0)
        zero, scale = _zero_scale(low, high, in_channel, LEVELS)
        stats = token_group * dim + channel
        tl.store(zero_ptr + stats, zero.to(tl.float16), mask=in_channel)
        tl.store(scale_ptr + stats, scale.to(tl.float16), mask=in_channel)
        packed = _packed(x, zero[None], scale[None], inside, lane[None, None, :], LEVELS, PER)
        tl.store(
            packed_ptr + row[:, None] * n_bytes + b[None, :], packed, mask=in_group[:, None] & (b < n_bytes)[None, :]
        )


def _launch_token(
    rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, levels: int, per: int
) -> None:
    """The axis="token" kernel over (rows, d): BLOCK_R rows a program, as many as fill a tile."""
    count, dim = rows.shape
    block_g, block_e = triton.next_power_of_2(dim // group), triton.next_power_of_2(group)
    block_b, block_p = triton.next_power_of_2(packed.shape[-1]), triton.next_power_of_2(per)
    block_r = min(max(1, TILE // max(block_g * block_e, block_b * block_p)), triton.next_power_of_2(count))
    _token_kernel[(triton.cdiv(count, block_r),)](
        rows,
        packed,
        scale,
        zero,
        count,
        dim,
        group,
        dim // group,
        packed.shape[-1],
        *rows.stride(),
        LEVELS=levels,
        PER=per,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
        BLOCK_E=block_e,
        BLOCK_B=block_b,
        BLOCK_P=block_p,
    )


def _launch_channel(
    rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, levels: int, per: int
) -> None:
    """The axis="channel" kernel over (rows, d): a program per token group and BLOCK_B bytes of channels."""
    n_bytes = packed.shape[-1]
    block_t, block_p = triton.next_power_of_2(group), triton.next_power_of_2(per)
    block_b = min(triton.next_power_of_2(n_bytes), max(1, TILE // (block_t * block_p)))
    _channel_kernel[(rows.shape[0] // group, triton.cdiv(n_bytes, block_b))](
        rows,
        packed,
        scale,
        zero,
        rows.shape[1],
        group,
        n_bytes,
        *rows.stride(),
        LEVELS=levels,
        PER=per,
        BLOCK_T=block_t,
        BLOCK_B=block_b,
        BLOCK_P=block_p,
    )


def quantize_pack_triton(x: torch.Tensor, bits: float, group: int, axis: str = "token") -> Quantized:
    """`tokred.kv.quantize(x, bits, group, axis)` by the Triton kernels, byte for byte.

    Unlike the reference it does not check that the float16 scales and zeros stayed finite (that would wait on
    the GPU): values and group ranges past ±65504 give infinite ones.
    """
    levels = code_levels(bits)
    group_dim(x.shape, group, axis)
    *lead, n, dim = x.shape
    per = per_byte(levels)
    packed = torch.empty(*lead, n, triton.cdiv(dim, per), dtype=torch.uint8, device=x.device)
    stats = (*lead, n // group, dim) if axis == "channel" else (*lead, n, dim // group)
    scale = torch.empty(stats, dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    if x.numel():  # an empty grid has no programs to launch
        launch = _launch_channel if axis == "channel" else _launch_token
        launch(x.reshape(-1, dim), packed, scale, zero, group, levels, per)
    return Quantized(packed, scale, zero, bits, group, axis, x.shape)


def quantize_pack(x: torch.Tensor, bits: float, group: int, axis: str = "token", *, backend: str = "auto") -> Quantized:
    """x (..., n, d) quantized group-wise and packed, as `tokred.kv.quantize` defines it: the Triton kernel where
    it runs, else that reference. backend: "auto", "triton" (an error where it cannot run) or "torch"."""
    if resolve(backend, x) == "triton":
        return quantize_pack_triton(x, bits, group, axis)
    return quantize(x, bits, group, axis)
