"""Decode attention over the quantized KV cache: one query step against the packed store and the residual window.

The torch reference dequantizes the store, appends the residual window and takes softmax attention in float32.
The Triton kernel never writes a dequantized copy: a program per (sequence split, sample, kv head) scores the kv
head's G query heads together (GQA: they are the rows of its matrix products) against BLOCK_N tokens at a time,
unpacking the codes in registers (a shift and mask for 1, 2, 4 and 8 bits, base-3 digits for ternary), applying
each group's float16 scale and zero (per channel or per token, as `Quantized.axis` says), and keeps an online
softmax (running max, sum and weighted values). The residual window is one more split, read in full precision.
A second kernel merges the splits' partial results by log-sum-exp. `decode_attention` reads a grouped store (int8,
KIVI), `mixed_attention` VidKV's (`tokred.kv.mixed`, whole blocks a split; see `_mixed_split_kernel`), and
`store_attention` whichever a cache layer holds: what tokred's kv stage calls at every decode step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from tokred.kernels.dispatch import interpreting, resolve, triton
from tokred.kernels.last_query import _default_splits
from tokred.kv.mixed import MixedStore, rdft
from tokred.kv.packing import per_byte
from tokred.kv.quant import Quantized, code_levels, dequantize
from tokred.kv.store import GroupedStore, Store

if triton is not None:
    import triton.language as tl

BLOCK_N = 64  # tokens a program reads at a time


def _check(
    query: torch.Tensor,
    stored_shape: torch.Size | None,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    key_mask: torch.Tensor | None,
) -> int:
    """Tokens in the store (of keys and values shaped `stored_shape`; None: no store), after checking that the
    operands are one layer's decode step (ValueError if not)."""
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
    stored = 0 if stored_shape is None else stored_shape[-2]
    if stored_shape is not None and tuple(stored_shape) != (batch, kv_heads, stored, dim):
        raise ValueError(
            f"the store {tuple(stored_shape)} must be (batch, kv heads, tokens, head dim) = ({batch}, {kv_heads}, "
            f"tokens, {dim}), as the residual"
        )
    total = stored + residual_keys.shape[2]
    if total == 0:
        raise ValueError("no keys to attend to: the store and the residual window are both empty")
    if key_mask is not None and tuple(key_mask.shape) != (batch, total):
        raise ValueError(
            f"key_mask must be (batch, stored + residual tokens) = {(batch, total)}; got {tuple(key_mask.shape)}"
        )
    return stored


def _store_shape(keys: Quantized | None, values: Quantized | None) -> torch.Size | None:
    """The shape of a grouped store's keys and values, after checking that they are alike (ValueError if not)."""
    if (keys is None) != (values is None):
        raise ValueError("keys and values must both be stores or both be None")
    if keys is not None and keys.shape != values.shape:
        raise ValueError(f"stored keys {tuple(keys.shape)} and values {tuple(values.shape)} must be alike")
    return None if keys is None else keys.shape


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
        return _attend_logits(s, v, allowed, top, total, acc, softmax_scale, q.dtype)

    @triton.jit
    def _attend_logits(s, v, allowed, top, total, acc, softmax_scale, dtype: tl.constexpr):
        """`_attend` from the block's logits `s` (the query against each key), products taken in `dtype`."""
        s = tl.where(allowed[None, :], s * softmax_scale, float("-inf"))
        new_top = tl.maximum(top, tl.max(s, axis=1))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no allowed key yet: keep exp() finite
        p = tl.exp(s - shift[:, None])
        rescale = tl.exp(top - shift)
        total = total * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(dtype), v.to(dtype), input_precision="ieee")
        return new_top, total, acc

    @triton.jit
    def _window(
        q,
        rk_ptr,
        rv_ptr,
        mask_ptr,
        stored,
        window,
        stride_rkn,
        stride_rkd,
        stride_rvn,
        stride_rvd,
        stride_mn,
        d,
        in_dim,
        top,
        total,
        acc,
        softmax_scale,
        HAS_MASK: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """The residual window (one sample and kv head, pointers at it) into the online softmax, in full precision;
        its key mask entries follow the store's `stored` tokens."""
        for start in tl.range(0, window, BLOCK_N):
            token = start + tl.arange(0, BLOCK_N)
            allowed = token < window
            inside = allowed[:, None] & in_dim[None, :]
            k = tl.load(rk_ptr + token[:, None] * stride_rkn + d[None, :] * stride_rkd, mask=inside, other=0.0)
            v = tl.load(rv_ptr + token[:, None] * stride_rvn + d[None, :] * stride_rvd, mask=inside, other=0.0)
            if HAS_MASK:
                allowed &= tl.load(mask_ptr + (stored + token) * stride_mn, mask=allowed, other=0) != 0
            top, total, acc = _attend(q, k, v, allowed, top, total, acc, softmax_scale)
        return top, total, acc

    @triton.jit
    def _write_partials(
        acc_ptr, max_ptr, sum_ptr, row, g, d, in_dim, top, total, acc, G: tl.constexpr, HEAD_DIM: tl.constexpr
    ):
        """One program's running max, sum and weighted values, at split `program_id(0)` of query heads `row`."""
        stats = row * tl.num_programs(0) + tl.program_id(0)
        tl.store(max_ptr + stats, top, mask=g < G)
        tl.store(sum_ptr + stats, total, mask=g < G)
        tl.store(acc_ptr + stats[:, None] * HEAD_DIM + d[None, :], acc, mask=(g < G)[:, None] & in_dim[None, :])

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
            top, total, acc = _window(
                q,
                rk_ptr + b * stride_rkb + h * stride_rkh,
                rv_ptr + b * stride_rvb + h * stride_rvh,
                mask_ptr + b * stride_mb,
                stored,
                window,
                stride_rkn,
                stride_rkd,
                stride_rvn,
                stride_rvd,
                stride_mn,
                d,
                in_dim,
                top,
                total,
                acc,
                softmax_scale,
                HAS_MASK,
                BLOCK_N,
            )
        _write_partials(acc_ptr, max_ptr, sum_ptr, row, g, d, in_dim, top, total, acc, G, HEAD_DIM)

    @triton.jit
    def _bits(ptr, index, inside):
        """Bit `index` (0 lowest of each byte) of a row of packed bits."""
        return (tl.load(ptr + index // 8, mask=inside, other=0).to(tl.int32) >> (index % 8)) & 1

    @triton.jit
    def _mixed_split_kernel(
        q_ptr,
        wp_ptr,
        ws_ptr,
        wz_ptr,
        np_ptr,
        ns_ptr,
        nz_ptr,
        pp_ptr,
        ps_ptr,
        pz_ptr,
        sp_ptr,
        ss_ptr,
        sz_ptr,
        wide_ptr,
        salient_ptr,
        basis_ptr,
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
        stride_wpb,
        stride_wph,
        stride_wpn,
        stride_wpc,
        stride_wsb,
        stride_wsh,
        stride_wsn,
        stride_wsc,
        stride_npb,
        stride_nph,
        stride_npn,
        stride_npc,
        stride_nsb,
        stride_nsh,
        stride_nsn,
        stride_nsc,
        stride_ppb,
        stride_pph,
        stride_ppn,
        stride_ppc,
        stride_psb,
        stride_psh,
        stride_psn,
        stride_psc,
        stride_spb,
        stride_sph,
        stride_spn,
        stride_spc,
        stride_ssb,
        stride_ssh,
        stride_ssn,
        stride_ssc,
        stride_amb,
        stride_amh,
        stride_amn,
        stride_amc,
        stride_smb,
        stride_smn,
        stride_smc,
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
        GROUP: tl.constexpr,
        WIDE: tl.constexpr,
        KEPT: tl.constexpr,
        KEPT_GROUP: tl.constexpr,
        SALIENT: tl.constexpr,
        S_LEVELS: tl.constexpr,
        S_PER: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """`_split_kernel` over VidKV's store (`tokred.kv.mixed`): a split is `chunk` whole blocks of GROUP tokens.
        Per block, the channel bits say where each channel's codes are: a wide channel's 2-bit codes are read at
        its rank among the wide ones, in the channel's place, so the query dots them as they are; the narrow
        channels' 1-bit codes are rdft coefficients, which the query dots once taken through the same transform
        (`basis`: the rdft of the identity, rows picked by each narrow channel's rank). A token's value is its
        ternary row among the block's KEPT plain tokens or its per-token row among the SALIENT ones; the salient
        bits say which position each stored row came from, for the key mask. Scales and zeros share strides."""
        split = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64) // kv_heads
        h = tl.program_id(1).to(tl.int64) % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        in_dim = d < HEAD_DIM
        row = (b * kv_heads + h) * G + g
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
            e = tl.arange(0, BLOCK_E)
            p = tl.arange(0, BLOCK_P)
            for block in tl.range(split * chunk, tl.minimum(split * chunk + chunk, stored // GROUP)):
                wide = _bits(wide_ptr + b * stride_amb + h * stride_amh + block * stride_amn, d, in_dim) != 0
                wide_rank = tl.cumsum(wide.to(tl.int32), axis=0) - wide.to(tl.int32)
                narrow = in_dim & ~wide
                narrow_rank = tl.cumsum(narrow.to(tl.int32), axis=0) - narrow.to(tl.int32)
                transform = tl.load(
                    basis_ptr + narrow_rank[:, None] * (HEAD_DIM - WIDE) + e[None, :],
                    mask=narrow[:, None] & (e < HEAD_DIM - WIDE)[None, :],
                    other=0.0,
                )
                q_narrow = tl.dot(q, transform.to(q.dtype), input_precision="ieee").to(q.dtype)
                if HAS_MASK:
                    salient = _bits(salient_ptr + b * stride_smb + block * stride_smn, p, p < GROUP) != 0
                    salient_rank = tl.cumsum(salient.to(tl.int32), axis=0) - salient.to(tl.int32)
                    plain_rank = p - salient_rank
                for start in tl.range(0, GROUP, BLOCK_N):
                    i = start + tl.arange(0, BLOCK_N)
                    allowed = i < GROUP
                    token = block * GROUP + i
                    k_wide = _dequantized(
                        wp_ptr + b * stride_wpb + h * stride_wph,
                        ws_ptr + b * stride_wsb + h * stride_wsh,
                        wz_ptr + b * stride_wsb + h * stride_wsh,
                        stride_wpn,
                        stride_wpc,
                        stride_wsn,
                        stride_wsc,
                        stride_wsn,
                        stride_wsc,
                        token,
                        wide_rank,
                        allowed[:, None] & wide[None, :],
                        4,
                        4,
                        GROUP,
                        True,
                    )
                    k_narrow = _dequantized(
                        np_ptr + b * stride_npb + h * stride_nph,
                        ns_ptr + b * stride_nsb + h * stride_nsh,
                        nz_ptr + b * stride_nsb + h * stride_nsh,
                        stride_npn,
                        stride_npc,
                        stride_nsn,
                        stride_nsc,
                        stride_nsn,
                        stride_nsc,
                        token,
                        e,
                        allowed[:, None] & (e < HEAD_DIM - WIDE)[None, :],
                        2,
                        8,
                        GROUP,
                        True,
                    )
                    s = tl.dot(q, tl.trans(k_wide.to(q.dtype)), input_precision="ieee")
                    s += tl.dot(q_narrow, tl.trans(k_narrow.to(q.dtype)), input_precision="ieee")
                    plain = allowed & (i < KEPT)
                    v_plain = _dequantized(
                        pp_ptr + b * stride_ppb + h * stride_pph,
                        ps_ptr + b * stride_psb + h * stride_psh,
                        pz_ptr + b * stride_psb + h * stride_psh,
                        stride_ppn,
                        stride_ppc,
                        stride_psn,
                        stride_psc,
                        stride_psn,
                        stride_psc,
                        block * KEPT + i,
                        d,
                        plain[:, None] & in_dim[None, :],
                        3,
                        5,
                        KEPT_GROUP,
                        True,
                    )
                    v_salient = _dequantized(
                        sp_ptr + b * stride_spb + h * stride_sph,
                        ss_ptr + b * stride_ssb + h * stride_ssh,
                        sz_ptr + b * stride_ssb + h * stride_ssh,
                        stride_spn,
                        stride_spc,
                        stride_ssn,
                        stride_ssc,
                        stride_ssn,
                        stride_ssc,
                        block * SALIENT + i - KEPT,
                        d,
                        (allowed & (i >= KEPT))[:, None] & in_dim[None, :],
                        S_LEVELS,
                        S_PER,
                        HEAD_DIM,
                        False,
                    )
                    v = tl.where(plain[:, None], v_plain, v_salient)
                    if HAS_MASK:  # the position stored row i came from: the (i)th plain or (i - KEPT)th salient one
                        rank = tl.where(salient, salient_rank, plain_rank)
                        wanted = tl.where(i < KEPT, i, i - KEPT)
                        match = (salient[None, :] == (i >= KEPT)[:, None]) & (rank[None, :] == wanted[:, None])
                        at = tl.sum(tl.where(match & (p < GROUP)[None, :], p[None, :], 0), axis=1)
                        position = block * GROUP + at
                        allowed &= tl.load(mask_ptr + b * stride_mb + position * stride_mn, mask=allowed, other=0) != 0
                    top, total, acc = _attend_logits(s, v, allowed, top, total, acc, softmax_scale, q.dtype)
        else:
            top, total, acc = _window(
                q,
                rk_ptr + b * stride_rkb + h * stride_rkh,
                rv_ptr + b * stride_rvb + h * stride_rvh,
                mask_ptr + b * stride_mb,
                stored,
                window,
                stride_rkn,
                stride_rkd,
                stride_rvn,
                stride_rvd,
                stride_mn,
                d,
                in_dim,
                top,
                total,
                acc,
                softmax_scale,
                HAS_MASK,
                BLOCK_N,
            )
        _write_partials(acc_ptr, max_ptr, sum_ptr, row, g, d, in_dim, top, total, acc, G, HEAD_DIM)

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
    stored = _check(query, _store_shape(keys, values), residual_keys, residual_values, key_mask)
    batch, _, _, dim = query.shape
    kv_heads = residual_keys.shape[1]
    store_splits = 0
    chunk = block_n
    if stored:
        store_splits = min(splits or _default_splits(residual_keys, batch * kv_heads), triton.cdiv(stored, block_n))
        chunk = triton.cdiv(triton.cdiv(stored, store_splits), block_n) * block_n
        store_splits = triton.cdiv(stored, chunk)
    loaded = _kernel_query(query)
    key_tensors, key_strides, key_layout = _store_args(keys, residual_keys, "K_")
    value_tensors, value_strides, value_layout = _store_args(values, residual_values, "V_")
    return _run(
        _split_kernel,
        [loaded, *key_tensors, *value_tensors],
        [*loaded.stride(), *key_strides, *value_strides],
        {**key_layout, **value_layout, "BLOCK_N": block_n},
        query,
        residual_keys,
        residual_values,
        key_mask,
        (stored, store_splits, chunk),
        scale,
    )


def _kernel_query(query: torch.Tensor) -> torch.Tensor:
    """The query as the kernels load it: float32 unless it is float16, bfloat16 or float32 already."""
    return query if query.dtype in (torch.float16, torch.bfloat16, torch.float32) else query.float()


def _run(
    kernel: Any,
    tensors: list[torch.Tensor],
    strides: list[int],
    meta: dict[str, Any],
    query: torch.Tensor,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    key_mask: torch.Tensor | None,
    plan: tuple[int, int, int],
    scale: float,
) -> torch.Tensor:
    """Launch a split kernel over `plan` (tokens stored, store splits, store units a split) and the residual
    window's split, then merge the splits by log-sum-exp: (B, Hq, 1, D) in the query's dtype. `tensors` and
    `strides` are the kernel's leading operands and their strides, `meta` its layout constexprs."""
    batch, heads, _, dim = query.shape
    _, kv_heads, window, _ = residual_keys.shape
    stored, store_splits, chunk = plan
    programs = store_splits + (window > 0)
    acc = torch.empty(batch * heads, programs, dim, dtype=torch.float32, device=query.device)
    maxes = torch.empty(batch * heads, programs, dtype=torch.float32, device=query.device)
    sums = torch.empty_like(maxes)
    mask = query if key_mask is None else key_mask.to(query.device)
    mask_strides = (0, 0) if key_mask is None else mask.stride()
    block_d = max(16, triton.next_power_of_2(dim))
    kernel[(programs, batch * kv_heads)](
        *tensors,
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
        *strides,
        *residual_keys.stride(),
        *residual_values.stride(),
        *mask_strides,
        HAS_MASK=key_mask is not None,
        DOT_FP32=query.dtype == torch.float32 or interpreting(),  # the interpreter's bf16 dot is wrong
        G=heads // kv_heads,
        HEAD_DIM=dim,
        BLOCK_G=max(16, triton.next_power_of_2(heads // kv_heads)),
        BLOCK_D=block_d,
        **meta,
    )
    out = torch.empty(batch, heads, 1, dim, dtype=query.dtype, device=query.device)
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
    _check(query, _store_shape(keys, values), residual_keys, residual_values, key_mask)
    stores = [t for q in (keys, values) if q is not None for t in (q.packed, q.scale, q.zero)]
    tensors = [t for t in (query, residual_keys, residual_values, key_mask, *stores) if t is not None]
    args = (query, keys, values, residual_keys, residual_values, scale, key_mask)
    if resolve(backend, *tensors) == "triton":
        return decode_attention_triton(*args)
    return decode_attention_reference(*args)


@functools.lru_cache(maxsize=16)
def _basis(n: int, device: torch.device) -> torch.Tensor:
    """float32 (n, n): row r the rdft of channel r alone (how a narrow channel's query value spreads over the
    coefficients), which `_mixed_split_kernel` picks rows of by each narrow channel's rank."""
    return rdft(torch.eye(n, device=device)).contiguous()


def mixed_attention_reference(
    query: torch.Tensor,
    store: MixedStore,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, Hq, 1, D) in query's dtype: softmax attention over VidKV's store dequantized, then the residual."""
    keys, values = store.dequantize()
    keys, values = (torch.cat([x, r.float()], dim=-2) for x, r in ((keys, residual_keys), (values, residual_values)))
    return decode_attention_reference(query, None, None, keys, values, scale, key_mask)


def mixed_attention_triton(
    query: torch.Tensor,
    store: MixedStore,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    scale: float,
    key_mask: torch.Tensor | None = None,
    *,
    block_n: int = BLOCK_N,
    splits: int | None = None,
) -> torch.Tensor:
    """(B, Hq, 1, D) like `mixed_attention_reference`, by the Triton kernels; the store read in `splits` runs of
    whole blocks per (sample, kv head) (default: enough programs to fill the GPU), the residual in one."""
    stored = _check(query, store.shape, residual_keys, residual_values, key_mask)
    batch, kv_heads = query.shape[0], residual_keys.shape[1]
    layout = store.layout
    blocks = stored // layout.group
    store_splits = min(splits or _default_splits(residual_keys, batch * kv_heads), blocks)
    chunk = triton.cdiv(blocks, store_splits) if store_splits else 1
    store_splits = triton.cdiv(blocks, chunk)
    loaded = _kernel_query(query)
    parts = store.parts()
    for q in parts:
        if q.scale.stride() != q.zero.stride():
            raise ValueError("the kernel reads a part's scales and zeros with the same strides")
    narrow = layout.head_dim - layout.anomalous
    basis = _basis(narrow, query.device)
    masks = (store.anomalous_mask, store.salient_mask)
    levels = code_levels(layout.salient_bits)
    meta = {
        "GROUP": layout.group,
        "WIDE": layout.anomalous,
        "KEPT": layout.group - layout.salient,
        "KEPT_GROUP": max(layout.group - layout.salient, 1),  # the plain values' scale rows (one a block)
        "SALIENT": layout.salient,
        "S_LEVELS": levels,
        "S_PER": per_byte(levels),
        "BLOCK_N": min(block_n, max(16, triton.next_power_of_2(layout.group))),
        "BLOCK_E": max(16, triton.next_power_of_2(narrow)),
        "BLOCK_P": triton.next_power_of_2(layout.group),
    }
    return _run(
        _mixed_split_kernel,
        [loaded, *(t for q in parts for t in (q.packed, q.scale, q.zero)), *masks, basis],
        [
            *loaded.stride(),
            *(n for q in parts for t in (q.packed, q.scale) for n in t.stride()),
            *(n for mask in masks for n in mask.stride()),
        ],
        meta,
        query,
        residual_keys,
        residual_values,
        key_mask,
        (stored, store_splits, chunk),
        scale,
    )


def mixed_attention(
    query: torch.Tensor,
    store: MixedStore,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    scale: float,
    *,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`decode_attention` over a layer's VidKV store (`tokred.kv.mixed`) and residual window: the Triton kernel
    where it runs (no dequantized copy of the store), else the reference. key_mask (B, n + r) in token order."""
    _check(query, store.shape, residual_keys, residual_values, key_mask)
    tensors = [query, residual_keys, residual_values, *(t for q in store.parts() for t in (q.packed, q.scale, q.zero))]
    args = (query, store, residual_keys, residual_values, scale, key_mask)
    if resolve(backend, *(t for t in (*tensors, key_mask) if t is not None)) == "triton":
        return mixed_attention_triton(*args)
    return mixed_attention_reference(*args)


def store_attention(
    query: torch.Tensor,
    store: Store | None,
    residual_keys: torch.Tensor,
    residual_values: torch.Tensor,
    scale: float,
    *,
    key_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step's attention over a `tokred.kv.QuantizedKVLayer`'s store (None: none yet) and residual
    window, by `decode_attention` (a grouped store) or `mixed_attention` (VidKV's); key_mask (B, n + r) in token
    order."""
    if isinstance(store, MixedStore):
        return mixed_attention(query, store, residual_keys, residual_values, scale, key_mask=key_mask, backend=backend)
    if store is not None and not isinstance(store, GroupedStore):
        raise TypeError(f"the fused decode attention does not read a {type(store).__name__}")
    keys, values = (None, None) if store is None else (store.keys, store.values)
    return decode_attention(
        query, keys, values, residual_keys, residual_values, scale, key_mask=key_mask, backend=backend
    )
