"""Quantize-and-pack of VidKV's mixed store (`tokred.kv.mixed`): a Triton kernel for each step of its encode,
beside the torch reference steps there (same names, less `_triton`), with the same bytes, scales and zeros.

`MixedLayout.encode` picks the steps (`backend="auto"`: these where Triton runs) and runs one step in torch on
either path: the orthonormal DFT of each block's narrow key channels (`tokred.kv.mixed.narrow_coefficients`,
torch.fft), whose float32 coefficients the 1-bit step then quantizes, so both paths quantize the same floats.
- `rank_channels_triton`: for each (sample, head, block), several a program where they fit a tile, finds each
  channel's range over the block's tokens, its rank (widest first, ties to the lower channel) from a (channel,
  channel) comparison, and writes the wide flags packed 8 to a byte and the channel order the store keeps (wide
  channels first, each part in channel order);
- `wide_keys_triton`, `split_values_triton`: `kv_pack`'s per-channel and per-token kernels, reading each stored
  row through the block's token order (and each wide key column through its channel order) as they load;
- `binary_triton`: 1 bit per channel over a block, split at the group's mean, the two levels the means of each
  side. Its sums run in the reference's pairwise order (`tokred.kv.mixed.pairwise_sum`), so the floats agree.
"""

from __future__ import annotations

import torch

from tokred.kernels import kv_pack
from tokred.kernels.dispatch import triton
from tokred.kv.quant import TERNARY, Quantized, group_dim

if triton is not None:  # the kernels need triton to be defined; without it the layout runs the torch steps
    import triton.language as tl

    @triton.jit
    def _rank_kernel(
        x_ptr,
        rows_ptr,
        order_ptr,
        mask_ptr,
        dim,
        group,
        blocks,
        wide,
        mask_bytes,
        stride_xd,
        BLOCK_K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """BLOCK_K blocks, each of one sample and head (block k's rows at rows_ptr[k * group + t]): each channel's
        range over the block's tokens, BLOCK_T at a time; the `wide` widest flagged, a bit each, and the channel
        order written."""
        block = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        live = block < blocks
        c = tl.arange(0, BLOCK_D)
        in_channel = live[:, None] & (c < dim)[None, :]  # (block, channel)
        low = tl.full((BLOCK_K, BLOCK_D), float("inf"), tl.float32)
        high = tl.full((BLOCK_K, BLOCK_D), float("-inf"), tl.float32)
        for start in range(0, group, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            in_rows = live[:, None] & (t < group)[None, :]
            at = tl.load(rows_ptr + block[:, None] * group + t[None, :], mask=in_rows, other=0)
            inside = in_rows[:, :, None] & (c < dim)[None, None, :]  # (block, token, channel)
            x = tl.load(x_ptr + at[:, :, None] + c[None, None, :] * stride_xd, mask=inside, other=0.0)
            x = x.to(tl.float32)
            low = tl.minimum(low, tl.min(tl.where(inside, x, float("inf")), axis=1))
            high = tl.maximum(high, tl.max(tl.where(inside, x, float("-inf")), axis=1))
        spread = tl.where(in_channel, high - low, 0.0)
        mine, other = c[None, :, None], c[None, None, :]  # (block, channel, other channel)
        tied = (spread[:, None, :] == spread[:, :, None]) & (other < mine)
        ahead = ((spread[:, None, :] > spread[:, :, None]) | tied) & in_channel[:, None, :]
        flag = in_channel & (tl.sum(ahead.to(tl.int32), axis=2) < wide)
        earlier = other < mine
        position = tl.where(
            flag,
            tl.sum((earlier & flag[:, None, :]).to(tl.int32), axis=2),
            wide + tl.sum((earlier & (in_channel & ~flag)[:, None, :]).to(tl.int32), axis=2),
        )
        placed = (position[:, :, None] == other) & in_channel[:, :, None]  # (block, channel, stored column)
        order = tl.sum(tl.where(placed, mine, 0), axis=1)
        tl.store(order_ptr + block[:, None] * dim + c[None, :], order.to(tl.int64), mask=in_channel)
        bits = tl.reshape(flag.to(tl.int32), (BLOCK_K, BLOCK_D // 8, 8)) << tl.arange(0, 8)[None, None, :]
        b = tl.arange(0, BLOCK_D // 8)
        at_mask = mask_ptr + block[:, None] * mask_bytes + b[None, :]
        tl.store(at_mask, tl.sum(bits, axis=2).to(tl.uint8), mask=live[:, None] & (b < mask_bytes)[None, :])

    @triton.jit
    def _pairwise_sum(x, LOG2_T: tl.constexpr):
        """float32 sums of x (byte, lane, 2**LOG2_T tokens) over its tokens, adjacent pairs added level by level."""
        for _ in tl.static_range(LOG2_T):
            even, odd = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], x.shape[2] // 2, 2)))
            x = even + odd
        return tl.reshape(x, (x.shape[0], x.shape[1]))

    @triton.jit
    def _binary_kernel(
        x_ptr,
        rows_ptr,
        packed_ptr,
        scale_ptr,
        zero_ptr,
        dim,
        group,
        groups,
        n_bytes,
        stride_xd,
        BLOCK_K: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_T: tl.constexpr,
        LOG2_T: tl.constexpr,
    ):
        """BLOCK_K groups of `group` tokens and BLOCK_B bytes of channels (8 a byte), a tile's first axis over
        (token group, byte) pairs: each channel's mean over its group, a bit per value at or above it, and the two
        sides' means as a float16 zero (the lower) and scale."""
        q = tl.arange(0, BLOCK_K * BLOCK_B)
        token_group = tl.program_id(0).to(tl.int64) * BLOCK_K + q // BLOCK_B
        b = tl.program_id(1) * BLOCK_B + q % BLOCK_B
        lane = tl.arange(0, 8)
        t = tl.arange(0, BLOCK_T)
        in_group = (token_group < groups)[:, None] & (t < group)[None, :]  # (pair, token)
        row = token_group[:, None] * group + t[None, :]
        at = tl.load(rows_ptr + row, mask=in_group, other=0)
        channel = b[:, None] * 8 + lane[None, :]  # (pair, bit of the byte)
        in_channel = (channel < dim) & (token_group < groups)[:, None]
        inside = in_channel[:, :, None] & in_group[:, None, :]  # (pair, bit, token)
        x = tl.load(x_ptr + at[:, None, :] + (channel * stride_xd)[:, :, None], mask=inside, other=0.0)
        x = x.to(tl.float32)
        size = tl.zeros((BLOCK_K * BLOCK_B, 8), tl.int32) + group  # a tensor where triton passes a constant group
        mean = tl.math.div_rn(_pairwise_sum(x, LOG2_T), size.to(tl.float32))
        above = inside & (x >= mean[:, :, None])
        count = tl.sum(above.to(tl.int32), axis=2)
        high = tl.math.div_rn(_pairwise_sum(tl.where(above, x, 0.0), LOG2_T), tl.maximum(count, 1).to(tl.float32))
        low = _pairwise_sum(tl.where(inside & ~above, x, 0.0), LOG2_T)
        low = tl.math.div_rn(low, tl.maximum(size - count, 1).to(tl.float32))
        zero = tl.where(count == size, high, low).to(tl.float16)  # a constant group: both levels its value
        scale = (high - zero.to(tl.float32)).to(tl.float16)
        stats = token_group[:, None] * dim + channel
        tl.store(zero_ptr + stats, zero, mask=in_channel)
        tl.store(scale_ptr + stats, scale, mask=in_channel)
        packed = tl.sum(tl.where(above, 1, 0) << lane[None, :, None], axis=1).to(tl.uint8)  # (pair, token)
        tl.store(packed_ptr + row * n_bytes + b[:, None], packed, mask=in_group & (b < n_bytes)[:, None])


def _stored_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 (B, H, n): the element offset in x (B, H, n, d) of each stored row, token rows[b, i] at row i."""
    batch, heads, n, _ = x.shape
    return kv_pack.row_offsets(x).gather(2, rows[:, None, :].expand(batch, heads, n))


def rank_channels_triton(keys: torch.Tensor, group: int, wide: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokred.kv.mixed.rank_channels` by the Triton kernel: each block's channel order and packed wide flags."""
    batch, heads, n, dim = keys.shape
    blocks = n // group
    order = torch.empty(batch, heads, blocks, dim, dtype=torch.int64, device=keys.device)
    mask = torch.empty(batch, heads, blocks, triton.cdiv(dim, 8), dtype=torch.uint8, device=keys.device)
    if order.numel():
        count = batch * heads * blocks
        block_d = max(8, triton.next_power_of_2(dim))
        block_k = min(triton.next_power_of_2(count), max(1, kv_pack.TILE // (block_d * block_d)))
        block_t = min(triton.next_power_of_2(group), max(1, kv_pack.TILE // (block_k * block_d)))
        _rank_kernel[(triton.cdiv(count, block_k),)](
            keys,
            kv_pack.row_offsets(keys).flatten(),
            order,
            mask,
            dim,
            group,
            count,
            wide,
            mask.shape[-1],
            keys.stride(-1),
            BLOCK_K=block_k,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
        )
    return order, mask


def wide_keys_triton(keys: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, wide: int, group: int) -> Quantized:
    """`tokred.kv.mixed.wide_keys` by `kv_pack`'s per-channel kernel, gathering rows and channels as it loads."""
    batch, heads, n, dim = keys.shape
    return kv_pack.quantize_pack_rows_triton(
        keys, _stored_rows(keys, rows).flatten(), (batch, heads, n, wide), 2, group, "channel", order.reshape(-1, dim)
    )


def binary_triton(x: torch.Tensor, group: int) -> Quantized:
    """`tokred.kv.mixed.binary(x, group)` by the Triton kernel: x (..., n, d) at 1 bit per channel and group."""
    group_dim(x.shape, group, "channel")
    *lead, n, dim = x.shape
    packed = torch.empty(*lead, n, triton.cdiv(dim, 8), dtype=torch.uint8, device=x.device)
    scale = torch.empty(*lead, n // group, dim, dtype=torch.float16, device=x.device)
    zero = torch.empty_like(scale)
    if packed.numel():
        rows = kv_pack.row_offsets(x).flatten()
        groups, n_bytes = rows.numel() // group, packed.shape[-1]
        block_t = triton.next_power_of_2(group)
        block_b = min(triton.next_power_of_2(n_bytes), max(1, kv_pack.TILE // (8 * block_t)))
        block_k = min(triton.next_power_of_2(groups), max(1, kv_pack.TILE // (8 * block_t * block_b)))
        _binary_kernel[(triton.cdiv(groups, block_k), triton.cdiv(n_bytes, block_b))](
            x,
            rows,
            packed,
            scale,
            zero,
            dim,
            group,
            groups,
            n_bytes,
            x.stride(-1),
            BLOCK_K=block_k,
            BLOCK_B=block_b,
            BLOCK_T=block_t,
            LOG2_T=block_t.bit_length() - 1,
        )
    return Quantized(packed, scale, zero, 1, group, "channel", x.shape)


def split_values_triton(
    values: torch.Tensor, rows: torch.Tensor, group: int, salient: int, bits: int
) -> tuple[Quantized, Quantized]:
    """`tokred.kv.mixed.split_values` by `kv_pack`'s kernels: each block's plain tokens ternary per channel, its
    salient ones at `bits` per token, rows read in the block's token order."""
    batch, heads, n, dim = values.shape
    blocks, kept = n // group, group - salient
    plain, protected = _stored_rows(values, rows).view(batch, heads, blocks, group).split([kept, salient], dim=3)
    return (
        kv_pack.quantize_pack_rows_triton(
            values, plain.flatten(), (batch, heads, blocks * kept, dim), TERNARY, max(kept, 1), "channel"
        ),
        kv_pack.quantize_pack_rows_triton(
            values, protected.flatten(), (batch, heads, blocks * salient, dim), bits, dim, "token"
        ),
    )


STEPS = (rank_channels_triton, wide_keys_triton, binary_triton, split_values_triton)
"""The encode's quantizing steps in Triton, in the order of `tokred.kv.mixed.STEPS`."""
