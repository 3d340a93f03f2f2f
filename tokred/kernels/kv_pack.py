"""Quantize-and-pack of KV blocks: Triton kernels beside their torch reference, `tokred.kv.quantize`, and the
dispatcher between them.

The kernels give the reference's bytes, scales and zeros exactly: the same float32 steps (IEEE division through
div_rn, rounding half to even), the zero rounded down and the scale up to float16 alike. Every width packs the
same way, as base-`levels` digits, so one kernel per grouping serves 1, 1.58 (ternary), 2, 4 and 8 bits.

axis="token" (values; the decode path's layout): a program takes BLOCK_R rows whole, finds each group of
channels' scale and zero, then packs each byte's codes. A byte may straddle two groups (a group that is not a
multiple of the per-byte count), so the packing pass reads the scales back from memory, after a barrier.
axis="channel" (keys): a program takes BLOCK_K groups of tokens and BLOCK_B bytes' worth of channels (several
groups where one group's bytes leave room in a tile); groups run across tokens and bytes across channels, so it
packs straight from the tile it reduced.

Both kernels read each row through its element offset in x (`row_offsets`), so a strided view (transformers' keys
and values) is read in place, and VidKV's layout (`kv_pack_mixed`) has them gather its reordered tokens, and the
per-channel kernel its reordered channels, as they load (`quantize_pack_rows_triton`).
"""

from __future__ import annotations

import torch

from tokred.kernels.dispatch import interpreting, resolve, triton
from tokred.kv.packing import per_byte
from tokred.kv.quant import Quantized, code_levels, group_dim, quantize

if triton is not None:
    import triton.language as tl

TILE = 65536 if interpreting() else 4096
"""Elements a program holds in one tile: what a compiled program keeps in registers; more in triton's CPU
interpreter, which runs the programs one after another, so that fewer, larger ones run faster."""


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
        rows_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        rows,
        dim,
        group,
        groups,
        n_bytes,
        stride_xd,
        LEVELS: tl.constexpr,
        PER: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """BLOCK_R rows (row r of x at element offset rows_ptr[r]): a scale and zero per group of `group` channels,
        then the codes packed PER to a byte."""
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        in_rows = r < rows
        r = r.to(tl.int64)
        at = tl.load(rows_ptr + r, mask=in_rows, other=0)
        g = tl.arange(0, BLOCK_G)
        e = tl.arange(0, BLOCK_E)
        channel = g[:, None] * group + e[None, :]  # (group, element of the group)
        inside = in_rows[:, None, None] & ((g < groups)[:, None] & (e < group)[None, :])[None]
        x = tl.load(x_ptr + at[:, None, None] + channel[None] * stride_xd, mask=inside, other=0.0).to(tl.float32)
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
        x = tl.load(x_ptr + at[:, None, None] + channel[None] * stride_xd, mask=inside, other=0.0)
        stat = r[:, None, None] * groups + (channel // group)[None]
        zero = tl.load(zero_ptr + stat, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + stat, mask=inside, other=1.0).to(tl.float32)
        packed = _packed(x.to(tl.float32), zero, scale, inside, lane[None, None, :], LEVELS, PER)
        tl.store(packed_ptr + r[:, None] * n_bytes + b[None, :], packed, mask=in_rows[:, None] & (b < n_bytes)[None, :])

    @triton.jit
    def _channel_kernel(
        x_ptr,
        rows_ptr,
        channels_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        dim,
        group,
        groups,
        n_bytes,
        stride_xd,
        stride_channels,
        CHANNELS: tl.constexpr,
        LEVELS: tl.constexpr,
        PER: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_P: tl.constexpr,
    ):
        """BLOCK_K groups of `group` tokens (row r of x at element offset rows_ptr[r]) and BLOCK_B bytes of channels
        (with CHANNELS, channel j of token group k is x's channels_ptr[k * stride_channels + j]): a scale and zero
        per channel, codes packed. A tile's middle axis runs over (token group, byte) pairs."""
        q = tl.arange(0, BLOCK_K * BLOCK_B)
        token_group = tl.program_id(0).to(tl.int64) * BLOCK_K + q // BLOCK_B
        b = tl.program_id(1) * BLOCK_B + q % BLOCK_B
        t = tl.arange(0, BLOCK_T)
        in_group = (t < group)[:, None] & (token_group < groups)[None, :]  # (token, pair)
        row = token_group[None, :] * group + t[:, None]
        at = tl.load(rows_ptr + row, mask=in_group, other=0)
        lane = tl.arange(0, BLOCK_P)
        channel = b[:, None] * PER + lane[None, :]  # (pair, digit of the byte)
        in_channel = (lane[None, :] < PER) & (channel < dim) & (token_group < groups)[:, None]
        inside = in_group[:, :, None] & in_channel[None]
        source = channel
        if CHANNELS:
            at_channel = channels_ptr + token_group[:, None] * stride_channels + channel
            source = tl.load(at_channel, mask=in_channel, other=0)
        x = tl.load(x_ptr + at[:, :, None] + source[None] * stride_xd, mask=inside, other=0.0).to(tl.float32)
        low = tl.min(tl.where(inside, x, float("inf")), axis=0)
        high = tl.max(tl.where(inside, x, float("-inf")), axis=0)
        zero, scale = _zero_scale(low, high, in_channel, LEVELS)
        stats = token_group[:, None] * dim + channel
        tl.store(zero_ptr + stats, zero.to(tl.float16), mask=in_channel)
        tl.store(scale_ptr + stats, scale.to(tl.float16), mask=in_channel)
        packed = _packed(x, zero[None], scale[None], inside, lane[None, None, :], LEVELS, PER)
        tl.store(packed_ptr + row * n_bytes + b[None, :], packed, mask=in_group & (b < n_bytes)[None, :])


def row_offsets(x: torch.Tensor) -> torch.Tensor:
    """int64 (..., n): the element offset in x (..., n, d) of each of its rows, as the kernels take rows."""
    offsets = torch.zeros((), dtype=torch.int64, device=x.device)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        offsets = offsets[..., None] + torch.arange(size, device=x.device) * stride
    return offsets


def _launch_token(x: torch.Tensor, rows: torch.Tensor, q: Quantized, dim: int, levels: int, per: int) -> None:
    """The axis="token" kernel over the rows of x at `rows`: BLOCK_R rows a program, as many as fill a tile."""
    count, group, n_bytes = rows.numel(), q.group, q.packed.shape[-1]
    block_g, block_e = triton.next_power_of_2(dim // group), triton.next_power_of_2(group)
    block_b, block_p = triton.next_power_of_2(n_bytes), triton.next_power_of_2(per)
    block_r = min(max(1, TILE // max(block_g * block_e, block_b * block_p)), triton.next_power_of_2(count))
    _token_kernel[(triton.cdiv(count, block_r),)](
        x,
        rows,
        q.packed,
        q.scale,
        q.zero,
        count,
        dim,
        group,
        dim // group,
        n_bytes,
        x.stride(-1),
        LEVELS=levels,
        PER=per,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
        BLOCK_E=block_e,
        BLOCK_B=block_b,
        BLOCK_P=block_p,
    )


def _launch_channel(
    x: torch.Tensor, rows: torch.Tensor, q: Quantized, dim: int, levels: int, per: int, channels: torch.Tensor | None
) -> None:
    """The axis="channel" kernel over the rows of x at `rows`: a program per BLOCK_K token groups and BLOCK_B bytes
    of channels, as many groups as fill a tile."""
    group, groups, n_bytes = q.group, rows.numel() // q.group, q.packed.shape[-1]
    block_t, block_p = triton.next_power_of_2(group), triton.next_power_of_2(per)
    block_b = min(triton.next_power_of_2(n_bytes), max(1, TILE // (block_t * block_p)))
    block_k = min(triton.next_power_of_2(groups), max(1, TILE // (block_t * block_b * block_p)))
    _channel_kernel[(triton.cdiv(groups, block_k), triton.cdiv(n_bytes, block_b))](
        x,
        rows,
        rows if channels is None else channels,  # a stand-in the kernel does not read without CHANNELS
        q.packed,
        q.scale,
        q.zero,
        dim,
        group,
        groups,
        n_bytes,
        x.stride(-1),
        0 if channels is None else channels.stride(0),
        CHANNELS=channels is not None,
        LEVELS=levels,
        PER=per,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
        BLOCK_B=block_b,
        BLOCK_P=block_p,
    )


def quantize_pack_rows_triton(
    x: torch.Tensor,
    rows: torch.Tensor,
    shape: tuple[int, ...],
    bits: float,
    group: int,
    axis: str,
    channels: torch.Tensor | None = None,
) -> Quantized:
    """`tokred.kv.quantize(y, bits, group, axis)` by the Triton kernels, byte for byte, for the (..., n, d) tensor
    y of `shape` whose row i is x's row at element offset `rows[i]` (int64, `row_offsets`), read in place.

    `channels` (axis="channel" only): int64 (token groups, >= d) whose row k lists the channels of x that y's
    channels are in token group k. Unlike the reference it does not check that the float16 scales and zeros stayed
    finite (that would wait on the GPU): values and group ranges past ±65504 give infinite ones.
    """
    levels = code_levels(bits)
    shape = torch.Size(shape)
    group_dim(shape, group, axis)
    if channels is not None and axis != "channel":
        raise ValueError(f"channels gathers the channels of axis='channel' groups only, got axis={axis!r}")
    *lead, n, dim = shape
    per = per_byte(levels)
    packed = torch.empty(*lead, n, triton.cdiv(dim, per), dtype=torch.uint8, device=x.device)
    stats = (*lead, n // group, dim) if axis == "channel" else (*lead, n, dim // group)
    scale = torch.empty(stats, dtype=torch.float16, device=x.device)
    q = Quantized(packed, scale, torch.empty_like(scale), bits, group, axis, shape)
    if packed.numel():  # an empty grid has no programs to launch
        if axis == "channel":
            _launch_channel(x, rows, q, dim, levels, per, channels)
        else:
            _launch_token(x, rows, q, dim, levels, per)
    return q


def quantize_pack_triton(x: torch.Tensor, bits: float, group: int, axis: str = "token") -> Quantized:
    """`tokred.kv.quantize(x, bits, group, axis)` by the Triton kernels, byte for byte (see
    `quantize_pack_rows_triton`: no float16 overflow check)."""
    return quantize_pack_rows_triton(x, row_offsets(x).flatten(), x.shape, bits, group, axis)


def quantize_pack(x: torch.Tensor, bits: float, group: int, axis: str = "token", *, backend: str = "auto") -> Quantized:
    """x (..., n, d) quantized group-wise and packed, as `tokred.kv.quantize` defines it: the Triton kernel where
    it runs, else that reference. backend: "auto", "triton" (an error where it cannot run) or "torch"."""
    if resolve(backend, x) == "triton":
        return quantize_pack_triton(x, bits, group, axis)
    return quantize(x, bits, group, axis)
