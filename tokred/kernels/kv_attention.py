"""Decode attention over the quantized KV cache: one query step against the packed store and the residual window.

The torch reference dequantizes the store, appends the residual window and takes softmax attention in float32.
The Triton kernel never writes a dequantized copy: a program per (sequence split, sample, kv head) scores the kv
head's G query heads together (GQA: they are the rows of its matrix products) against BLOCK_N tokens at a time,
unpacking the codes in registers (a shift and mask for 1, 2, 4 and 8 bits, base-3 digits for ternary), applying
each group's float16 scale and zero (per channel or per token, as `Quantized.axis` says), and keeps an online
softmax (running max, sum and weighted values). The residual window is one more split, read in full precision.
A second kernel merges the splits' partial results by log-sum-exp.
"""

from __future__ import annotations

from typing import Any

import torch

from tokred.kernels.dispatch import interpreting, resolve, triton
from tokred.kernels.last_query import _default_splits
from tokred.kv.packing import per_byte
from tokred.kv.quant import Quantized, code_levels, dequantize

if triton is not None:
    import triton.language as tl

BLOCK_N = 64  # tokens a program reads at a time


def _check(
    query: torch.Tensor,
    keys: Quantized | None,
    values: Quantized | None,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> int:
    """Tokens in the store, after checking that the operands are one layer's decode step (ValueError if not)."""
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"query must be (batch, heads, 1, head dim): one decode step; got {tuple(query.shape)}")
    if residual_keys.dim() != 4 or residual_keys.shape != residual_values.shape:
        raise ValueError(
            f"residual keys and values must be (batch, kv heads, tokens, head dim) alike; got "
            f"{tuple(residual_keys.shape)} and {tuple(residual_values.shape)}"
        )
    batch, kv_heads, _, dim = residual_keys.shape
    if query.shape[0] != batch or query.shape[3] != dim or query.shape[1] % kv_heads:
        raise ValueError(
            f"query {tuple(query.shape)} must match the residual {tuple(residual_keys.shape)} in batch and head "
            "dim, with a multiple of its kv heads"
        )
    if (keys is None) != (values is None):
        raise ValueError("keys and values must both be stores or both be None")
    stored = 0 if keys is None else keys.shape[-2]
    if keys is not None and not keys.shape == values.shape == (batch, kv_heads, stored, dim):
        raise ValueError(
            f"stored keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be (batch, kv heads, "
            f"tokens, head dim) = ({batch}, {kv_heads}, tokens, {dim}), as the residual"
        )
    total = stored + residual_keys.shape[2]
    if total == 0:
        raise ValueError("no keys to attend to: the store and the residual window are both empty")
    if key_mask is not None and tuple(key_mask.shape) != (batch, total):
        raise ValueError(
            f"key_mask must be (batch, stored + residual tokens) = {(batch, total)}; got {tuple(key_mask.shape)}"
        )
    return stored


def decode_attention_reference(
    query: torch.Tensor,
    keys: Quantized | None,
    values: Quantized | None,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hq, 1, D) in query's dtype: softmax attention over the dequantized store then the residual (torch)."""
    k, v = residual_keys.float(), residual_values.float()
    if keys is not None:
        k, v = torch.cat([dequantize(keys), k], dim=-2), torch.cat([dequantize(values), v], dim=-2)
    batch, heads, _, dim = query.shape
    kv_heads = k.shape[1]
    q = query.float().view(batch, kv_heads, heads // kv_heads, dim)
    logits = torch.einsum("bkgd,bknd->bkgn", q, k) * scale
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgn,bknd->bkgd", logits.softmax(-1), v)
    return out.reshape(batch, heads, 1, dim).to(query.dtype)


if triton is not None:  # the kernels need triton to be defined; the reference above needs none of it

    @triton.jit
    def _digit(byte, place, LEVELS: tl.constexpr, PER: tl.constexpr):
        """Digit `place` (0 lowest) of each byte's base-LEVELS codes: a shift and mask where LEVELS is a power of
        two (8 // PER bits a code), else divisions (ternary)."""
        if (LEVELS & (LEVELS - 1)) == 0:
            return (byte >> (place * (8 // PER))) & (LEVELS - 1)
        weight = tl.full(place.shape, 1, tl.int32)
        for i in tl.static_range(1, PER):
            weight = tl.where(place >= i, weight * LEVELS, weight)
        return byte // weight % LEVELS

    @triton.jit
    def _dequantized(
        packed,
        scale,
        zero,
        stride_pn,
        stride_pc,
        stride_sn,
        stride_sc,
        stride_zn,
        stride_zc,
        token,
        d,
        inside,
        LEVELS: tl.constexpr,
        PER: tl.constexpr,
        GROUP: tl.constexpr,
        CHANNEL: tl.constexpr,
    ):
        """A (token, channel) block of a store in float32 registers: each code's level, zero + code * scale."""
        byte = tl.load(packed + token[:, None] * stride_pn + (d // PER)[None, :] * stride_pc, mask=inside, other=0)
        code = _digit(byte.to(tl.int32), (d % PER)[None, :], LEVELS, PER)
        if CHANNEL:  # a scale row per GROUP tokens, one scale per channel (KIVI's keys)
            row = token // GROUP
            col = d
        else:  # a scale per token and GROUP channels
            row = token
            col = d // GROUP
        s = tl.load(scale + row[:, None] * stride_sn + col[None, :] * stride_sc, mask=inside, other=0.0)
        z = tl.load(zero + row[:, None] * stride_zn + col[None, :] * stride_zc, mask=inside, other=0.0)
        return code.to(tl.float32) * s.to(tl.float32) + z.to(tl.float32)

    @triton.jit
    def _attend(q, k, v, allowed, top, total, acc, softmax_scale):
        """A block of keys and values into the online softmax: running max `top`, sum `total`, weighted `acc`."""
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee")  # fp32: no tf32
        s = tl.where(allowed[None, :], s * softmax_scale, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no allowed key yet: keep exp() finite
        p = tl.exp(s - shift[:, None])
        rescale = tl.exp(top - shift)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision="ieee")
        return new_top, total, acc

    @triton.jit
    def _split_kernel(
        q_ptr,
        kp_ptr,
        ks_ptr,
        kz_ptr,
        vp_ptr,
        vs_ptr,
        vz_ptr,
        rk_ptr,
        rv_ptr,
        mask_ptr,
        acc_ptr,
        max_ptr,
        sum_ptr,
        stored,
        window,
        kv_heads,
        chunk,
        store_splits,
        softmax_scale,
        stride_qb,
        stride_qh,
        stride_qq,
        stride_qd,
        stride_kpb,
        stride_kph,
        stride_kpn,
        stride_kpc,
        stride_ksb,
        stride_ksh,
        stride_ksn,
        stride_ksc,
        stride_kzb,
        stride_kzh,
        stride_kzn,
        stride_kzc,
        stride_vpb,
        stride_vph,
        stride_vpn,
        stride_vpc,
        stride_vsb,
        stride_vsh,
        stride_vsn,
        stride_vsc,
        stride_vzb,
        stride_vzh,
        stride_vzn,
        stride_vzc,
        stride_rkb,
        stride_rkh,
        stride_rkn,
        stride_rkd,
        stride_rvb,
        stride_rvh,
        stride_rvn,
        stride_rvd,
        stride_mb,
        stride_mn,
        HAS_MASK: tl.constexpr,
        DOT_FP32: tl.constexpr,
        G: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        K_LEVELS: tl.constexpr,
        K_PER: tl.constexpr,
        K_GROUP: tl.constexpr,
        K_CHANNEL: tl.constexpr,
        V_LEVELS: tl.constexpr,
        V_PER: tl.constexpr,
        V_GROUP: tl.constexpr,
        V_CHANNEL: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One (split, sample, kv head): the G query heads' running max, sum and weighted values over the split,
        a `chunk` of the store's tokens or (the last split) the residual window."""
        split = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64) // kv_heads
        h = tl.program_id(1).to(tl.int64) % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        in_dim = d < HEAD_DIM
        row = (b * kv_heads + h) * G + g  # the query head, over all samples
        q = tl.load(
            q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :] * stride_qd,
            mask=(g < G)[:, None] & in_dim[None, :],
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)
        top = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if split < store_splits:
            lo = split * chunk
            hi = tl.minimum(lo + chunk, stored)
            for start in tl.range(lo, hi, BLOCK_N):
                token = start + tl.arange(0, BLOCK_N)
                allowed = token < hi
                inside = allowed[:, None] & in_dim[None, :]
                k = _dequantized(
                    kp_ptr + b * stride_kpb + h * stride_kph,
                    ks_ptr + b * stride_ksb + h * stride_ksh,
                    kz_ptr + b * stride_kzb + h * stride_kzh,
                    stride_kpn,
                    stride_kpc,
                    stride_ksn,
                    stride_ksc,
                    stride_kzn,
                    stride_kzc,
                    token,
                    d,
                    inside,
                    K_LEVELS,
                    K_PER,
                    K_GROUP,
                    K_CHANNEL,
                )
                v = _dequantized(
                    vp_ptr + b * stride_vpb + h * stride_vph,
                    vs_ptr + b * stride_vsb + h * stride_vsh,
                    vz_ptr + b * stride_vzb + h * stride_vzh,
                    stride_vpn,
                    stride_vpc,
                    stride_vsn,
                    stride_vsc,
                    stride_vzn,
                    stride_vzc,
                    token,
                    d,
                    inside,
                    V_LEVELS,
                    V_PER,
                    V_GROUP,
                    V_CHANNEL,
                )
                if HAS_MASK:
                    allowed &= tl.load(mask_ptr + b * stride_mb + token * stride_mn, mask=allowed, other=0) != 0
                top, total, acc = _attend(q, k, v, allowed, top, total, acc, softmax_scale)
        else:
            for start in tl.range(0, window, BLOCK_N):
                token = start + tl.arange(0, BLOCK_N)
                allowed = token < window
                inside = allowed[:, None] & in_dim[None, :]
                k = tl.load(
                    rk_ptr + b * stride_rkb + h * stride_rkh + token[:, None] * stride_rkn + d[None, :] * stride_rkd,
                    mask=inside,
                    other=0.0,
                )
                v = tl.load(
                    rv_ptr + b * stride_rvb + h * stride_rvh + token[:, None] * stride_rvn + d[None, :] * stride_rvd,
                    mask=inside,
                    other=0.0,
                )
                if HAS_MASK:
                    at = mask_ptr + b * stride_mb + (stored + token) * stride_mn
                    allowed &= tl.load(at, mask=allowed, other=0) != 0
                top, total, acc = _attend(q, k, v, allowed, top, total, acc, softmax_scale)
        stats = row * tl.num_programs(0) + split
        tl.store(max_ptr + stats, top, mask=g < G)
        tl.store(sum_ptr + stats, total, mask=g < G)
        tl.store(acc_ptr + stats[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < G)[:, None] & in_dim[None, :])

    @triton.jit
    def _merge_kernel(
        acc_ptr, max_ptr, sum_ptr, out_ptr, splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        """One query head: its splits' partial results merged by log-sum-exp, written in the output's dtype."""
        row = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        in_split = s < splits
        tops = tl.load(max_ptr + row * splits + s, mask=in_split, other=float("-inf"))
        weight = tl.exp(tops - tl.max(tops, axis=0))
        total = tl.sum(tl.load(sum_ptr + row * splits + s, mask=in_split, other=0.0) * weight, axis=0)
        inside = in_split[:, None] & (d < HEAD_DIM)[None, :]
        acc = tl.load(acc_ptr + (row * splits + s)[:, None] * HEAD_DIM + d[None, :], mask=inside, other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / total
        tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def _store_args(
    store: Quantized | None, stand_in: torch.Tensor, prefix: str
) -> tuple[list[torch.Tensor], list[int], dict[str, Any]]:
    """A store's codes, scales and zeros, their strides, and its layout as constexprs named with `prefix`."""
    if store is None:  # no program reads a store: `stand_in` takes its tensors' places
        tensors, strides = [stand_in] * 3, [0] * 12
        layout = {"LEVELS": 2, "PER": 8, "GROUP": 1, "CHANNEL": False}
    else:
        levels = code_levels(store.bits)
        tensors = [store.packed, store.scale, store.zero]
        strides = [stride for t in tensors for stride in t.stride()]
        layout = {"LEVELS": levels, "PER": per_byte(levels), "GROUP": store.group, "CHANNEL": store.axis == "channel"}
    return tensors, strides, {prefix + name: value for name, value in layout.items()}


def decode_attention_triton(
    query: torch.Tensor,
    keys: Quantized | None,
    values: Quantized | None,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    block_n: int = BLOCK_N,
    splits: int | None = None,
) -> torch.Tensor:
    """(B, Hq, 1, D) like the reference, by the Triton kernels; the store read in `splits` chunks per (sample,
    kv head) of a multiple of `block_n` tokens (default: enough programs to fill the GPU), the residual in one."""
    stored = _check(query, keys, values, residual_keys, residual_values, key_mask)
    batch, heads, _, dim = query.shape
    _, kv_heads, window, _ = residual_keys.shape
    out = torch.empty(batch, heads, 1, dim, dtype=query.dtype, device=query.device)
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        query = query.float()
    store_splits = 0
    chunk = block_n
    if stored:
        store_splits = min(splits or _default_splits(residual_keys, batch * kv_heads), triton.cdiv(stored, block_n))
        chunk = triton.cdiv(triton.cdiv(stored, store_splits), block_n) * block_n
        store_splits = triton.cdiv(stored, chunk)
    programs = store_splits + (window > 0)
    acc = torch.empty(batch * heads, programs, dim, dtype=torch.float32, device=query.device)
    maxes = torch.empty(batch * heads, programs, dtype=torch.float32, device=query.device)
    sums = torch.empty_like(maxes)
    key_tensors, key_strides, key_layout = _store_args(keys, residual_keys, "K_")
    value_tensors, value_strides, value_layout = _store_args(values, residual_values, "V_")
    mask = query if key_mask is None else key_mask.to(query.device)
    mask_strides = (0, 0) if key_mask is None else mask.stride()
    block_d = max(16, triton.next_power_of_2(dim))
    _split_kernel[(programs, batch * kv_heads)](
        query,
        *key_tensors,
        *value_tensors,
        residual_keys,
        residual_values,
        mask,
        acc,
        maxes,
        sums,
        stored,
        window,
        kv_heads,
        chunk,
        store_splits,
        scale,
        *query.stride(),
        *key_strides,
        *value_strides,
        *residual_keys.stride(),
        *residual_values.stride(),
        *mask_strides,
        HAS_MASK=key_mask is not None,
        DOT_FP32=query.dtype == torch.float32 or interpreting(),  # the interpreter's bf16 dot is wrong
        G=heads // kv_heads,
        HEAD_DIM=dim,
        **key_layout,
        **value_layout,
        BLOCK_G=max(16, triton.next_power_of_2(heads // kv_heads)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    _merge_kernel[(batch * heads,)](
        acc, maxes, sums, out, programs, HEAD_DIM=dim, BLOCK_S=triton.next_power_of_2(programs), BLOCK_D=block_d
    )
    return out


def decode_attention(
    query: torch.Tensor,
    keys: Quantized | None,
    values: Quantized | None,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    scale: float,
    *,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step's attention over a quantized KV cache layer: the Triton kernel where it runs, else the
    reference.

    query (B, Hq, 1, D); keys and values one layer's stores as `QuantizedKVLayer` holds them, (B, Hkv, n, D)
    `Quantized` of any width and axis (None: no store); residual_keys and residual_values (B, Hkv, r, D), the
    window after the store (r may be 0); Hq a multiple of Hkv (GQA). key_mask (B, n + r), bool or 0/1, masks
    padding (a row with no allowed key gives NaN, as softmax does). Returns (B, Hq, 1, D) in query's dtype,
    computed in float32 (a bf16 or fp16 query's compiled kernel multiplies in that dtype, accumulating in
    float32). backend: "auto", "triton" (an error where it cannot run) or "torch". No autograd.
    """
    _check(query, keys, values, residual_keys, residual_values, key_mask)
    stores = [t for q in (keys, values) if q is not None for t in (q.packed, q.scale, q.zero)]
    tensors = [t for t in (query, residual_keys, residual_values, key_mask, *stores) if t is not None]
    args = (query, keys, values, residual_keys, residual_values, scale, key_mask)
    if resolve(backend, *tensors) == "triton":
        return decode_attention_triton(*args)
    return decode_attention_reference(*args)
