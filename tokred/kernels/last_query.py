"""Last-query attention, FastV's score: a torch reference, a Triton kernel, and the dispatcher between them.

For each sample b, query row `last[b]` attends over keys 0..last[b] that `key_valid` allows; the result is
the softmax averaged over query heads, (B, N) float32, with 0 for keys it may not attend to.

The kernel streams each (sample, kv head)'s keys once, split into chunks of the key axis so that even one
sample fills the GPU: a program scores its kv head's query heads against BLOCK_N keys at a time, writes the
raw logits and keeps an online max and sum. A second kernel merges the chunks' maxima and sums, normalizes
the logits and averages over heads.
"""

from __future__ import annotations

import torch

from tokred.kernels.dispatch import interpreting, resolve, triton

if triton is not None:
    import triton.language as tl

NORMALIZE_BLOCK = 256  # keys per program of the normalizing kernel
PROGRAMS_PER_SM = 2  # how many key chunks to aim for per streaming multiprocessor


def last_query_attention_reference(
    query: torch.Tensor, key: torch.Tensor, last: torch.Tensor, key_valid: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """(B, N): softmax attention of each sample's query row `last` over the keys, averaged over heads (torch)."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q = query[torch.arange(batch, device=query.device), :, last].float()  # (B, H, D)
    q = q.view(batch, kv_heads, heads // kv_heads, dim)
    logits = torch.einsum("bkgd,bknd->bkgn", q, key.float()) * scaling
    keys = torch.arange(key.shape[2], device=key.device)
    allowed = keys[None, :] <= last[:, None]
    if key_valid is not None:
        allowed = allowed & key_valid.bool()
    logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return logits.softmax(-1).mean(dim=(1, 2))


if triton is not None:  # the kernels need triton to be defined; the reference above needs none of it

    @triton.jit
    def _logits_kernel(
        q_ptr,
        k_ptr,
        last_ptr,
        valid_ptr,
        logits_ptr,
        max_ptr,
        sum_ptr,
        n_keys,
        kv_heads,
        group,
        chunk,
        scaling,
        stride_qb,
        stride_qh,
        stride_qq,
        stride_qd,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_kd,
        stride_vb,
        stride_vn,
        HAS_VALID: tl.constexpr,
        DOT_FP32: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """One (key chunk, sample, kv head): logits of the kv head's query heads, and their running max and sum."""
        split = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1).to(tl.int64) // kv_heads
        kv = tl.program_id(1).to(tl.int64) % kv_heads
        last = tl.load(last_ptr + b).to(tl.int64)
        lo = split * chunk
        hi = tl.minimum(tl.minimum(lo + chunk, last + 1), n_keys)  # causal: no key after the query row
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        head = kv * group + g
        in_group = g < group
        in_dim = d < HEAD_DIM  # folds away when HEAD_DIM == BLOCK_D, so key loads vectorize
        q = tl.load(
            q_ptr + b * stride_qb + head[:, None] * stride_qh + last * stride_qq + d[None, :] * stride_qd,
            mask=in_group[:, None] & in_dim[None, :],
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)
        rows = logits_ptr + (b * kv_heads * group + head[:, None]) * n_keys
        top = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        for start in tl.range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            inside = n < hi
            k = tl.load(
                k_ptr + b * stride_kb + kv * stride_kh + n[:, None] * stride_kn + d[None, :] * stride_kd,
                mask=inside[:, None] & in_dim[None, :],
                other=0.0,
            )
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # fp32: no tf32; bf16/fp16 products are exact in fp32
            allowed = inside
            if HAS_VALID:
                allowed &= tl.load(valid_ptr + b * stride_vb + n * stride_vn, mask=inside, other=0) != 0
            s = tl.where(allowed[None, :], s * scaling, float("-inf"))
            tl.store(rows + n[None, :], s, mask=in_group[:, None] & inside[None, :])
            new_top = tl.maximum(top, tl.max(s, axis=1))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no allowed key yet: keep exp() finite
            total = total * tl.exp(top - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
            top = new_top
        stats = (b * kv_heads * group + head) * tl.num_programs(0) + split
        tl.store(max_ptr + stats, top, mask=in_group)
        tl.store(sum_ptr + stats, total, mask=in_group)

    @triton.jit
    def _normalize_kernel(
        logits_ptr,
        max_ptr,
        sum_ptr,
        last_ptr,
        out_ptr,
        n_keys,
        heads,
        splits,
        BLOCK_N: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        """One (key block, sample): merge the chunks' max and sum per head, then the head-averaged softmax."""
        b = tl.program_id(1).to(tl.int64)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        allowed = (n <= tl.load(last_ptr + b)) & (n < n_keys)
        s = tl.arange(0, BLOCK_S)
        acc = tl.zeros([BLOCK_N], tl.float32)
        for h in tl.range(0, heads):
            row = b * heads + h
            tops = tl.load(max_ptr + row * splits + s, mask=s < splits, other=float("-inf"))
            top = tl.max(tops, axis=0)
            sums = tl.load(sum_ptr + row * splits + s, mask=s < splits, other=0.0)
            total = tl.sum(sums * tl.exp(tops - top), axis=0)
            x = tl.load(logits_ptr + row * n_keys + n, mask=allowed, other=float("-inf"))
            acc += tl.exp(x - top) / total
        tl.store(out_ptr + b * n_keys + n, acc / heads, mask=n < n_keys)


def _default_splits(key: torch.Tensor, programs: int) -> int:
    """Key chunks per (sample, kv head): enough programs to fill the GPU; one on the CPU interpreter."""
    if not key.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(key.device).multi_processor_count
    return triton.cdiv(PROGRAMS_PER_SM * sms, programs)


def last_query_attention_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    last: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    *,
    block_n: int = 64,
    splits: int | None = None,
) -> torch.Tensor:
    """(B, N) like the reference, by the Triton kernels; `splits` key chunks per (sample, kv head)."""
    batch, heads, _, dim = query.shape
    _, kv_heads, n_keys, _ = key.shape
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key heads ({kv_heads})")
    if query.dtype != key.dtype or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        query, key = query.float(), key.float()
    group = heads // kv_heads
    splits = min(splits or _default_splits(key, batch * kv_heads), triton.cdiv(n_keys, block_n))
    chunk = triton.cdiv(triton.cdiv(n_keys, splits), block_n) * block_n
    splits = triton.cdiv(n_keys, chunk)
    device = query.device
    last = last.to(device)
    logits = torch.empty(batch, heads, n_keys, dtype=torch.float32, device=device)
    maxes = torch.empty(batch, heads, splits, dtype=torch.float32, device=device)
    sums = torch.empty_like(maxes)
    out = torch.empty(batch, n_keys, dtype=torch.float32, device=device)
    valid = last if key_valid is None else key_valid.to(device)
    _logits_kernel[(splits, batch * kv_heads)](
        query,
        key,
        last,
        valid,
        logits,
        maxes,
        sums,
        n_keys,
        kv_heads,
        group,
        chunk,
        scaling,
        *query.stride(),
        *key.stride(),
        valid.stride(0),
        valid.stride(-1),
        HAS_VALID=key_valid is not None,
        DOT_FP32=query.dtype == torch.float32 or interpreting(),  # the interpreter's bf16 dot is wrong
        HEAD_DIM=dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    _normalize_kernel[(triton.cdiv(n_keys, NORMALIZE_BLOCK), batch)](
        logits,
        maxes,
        sums,
        last,
        out,
        n_keys,
        heads,
        splits,
        BLOCK_N=NORMALIZE_BLOCK,
        BLOCK_S=triton.next_power_of_2(splits),
    )
    return out


def last_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    last: torch.Tensor,
    key_valid: torch.Tensor | None,
    scaling: float,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """(B, N) last-query attention, averaged over heads: the Triton kernel where it runs, else the reference.

    query (B, H, Q, D) and key (B, Hkv, N, D) with H a multiple of Hkv (GQA); last (B,) the query row per
    sample; key_valid (B, N) or None masks padding; keys after `last` are masked (causal). Computed in
    float32. backend: "auto", "triton" (an error where it cannot run) or "torch". The Triton path has no
    autograd: FastV only ranks keys with the result.
    """
    tensors = [t for t in (query, key, last, key_valid) if t is not None]
    if resolve(backend, *tensors) == "triton":
        return last_query_attention_triton(query, key, last, key_valid, scaling)
    return last_query_attention_reference(query, key, last, key_valid, scaling)
