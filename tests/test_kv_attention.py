"""Fused decode attention over the quantized KV cache: the Triton kernel against its torch reference, and dispatch.

The kernel runs in triton's CPU interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET=1) and
compiled on one; either way it must match the reference, which dequantizes the store and attends in float32.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from conftest import compile_for_hopper

from tokred.kernels import dispatch, kv_attention
from tokred.kernels.kv_attention import (
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
    mixed_attention,
    mixed_attention_reference,
    mixed_attention_triton,
)
from tokred.kv import MixedLayout, MixedStore, Quantized, dequantize, quant, quantize
from tokred.kv.store import first_quantized

INTERPRETED = dispatch.interpreting()
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"
needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="needs triton")
needs_kernel = pytest.mark.skipif(
    dispatch.triton is None or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 for its CPU interpreter, set before triton's first "
    "import (tests/conftest.py sets it without a GPU, unless TRITON_INTERPRET is already set, e.g. to 0)",
)
# float32 output: both sides attend in float32 over the same dequantized levels; bf16: one rounding of the output
TOLERANCE = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}}
LAYOUTS = {"kivi": ("channel", "token"), "int8": ("token", "token")}  # key axis, value axis


def make_layer(
    batch: int,
    kv_heads: int,
    group_heads: int,
    stored: int,
    window: int,
    dim: int,
    bits: float,
    layout: str,
    group: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, Quantized | None, Quantized | None, torch.Tensor, torch.Tensor]:
    """query, stored keys and values (None where `stored` is None), residual keys and values for one decode step."""
    g = torch.Generator().manual_seed(seed)
    heads = kv_heads * group_heads
    query = (2 * torch.randn(batch, 1, heads, dim, generator=g)).to(dtype).transpose(1, 2)  # a transposed view
    filled = group if stored == 0 else stored or 0  # a store of zero tokens: a whole block's first none
    k, v = (torch.randn(batch, kv_heads, filled + window, dim, generator=g) for _ in range(2))
    k[..., 3] += 4  # an outlier channel, as keys have
    keys = values = None
    if stored is not None:
        keys, values = (
            first_quantized(quantize(x[..., :filled, :], bits, group, axis), stored)
            for x, axis in zip((k, v), LAYOUTS[layout], strict=True)
        )
    return query, keys, values, k[..., filled:, :].to(dtype), v[..., filled:, :].to(dtype)


def to_device(store: Quantized | None) -> Quantized | None:
    if store is None:
        return None
    moved = (t.to(KERNEL_DEVICE) for t in (store.packed, store.scale, store.zero))
    return Quantized(*moved, store.bits, store.group, store.axis, store.shape)


CASES = [  # batch, kv heads, G, stored, window, dim, bits, layout, group, block_n, splits
    (2, 2, 7, 80, 5, 32, 2, "kivi", 16, 32, 2),  # chunks of 64 tokens: the second split half a block
    (2, 1, 1, 37, 0, 16, 8, "int8", 16, 16, 3),  # no residual; 37 tokens, 3 blocks of 16
    (1, 2, 4, 32, 3, 64, 4, "kivi", 32, 16, None),
    (2, 1, 2, 48, 7, 128, 2, "int8", 32, 64, None),  # one block, part full
    (1, 1, 7, 24, 2, 32, 4, "int8", 8, 16, 2),
    (2, 2, 1, None, 6, 32, 2, "kivi", 16, 16, None),  # no store: the residual only
    (2, 2, 3, 0, 6, 16, 2, "kivi", 16, 16, None),  # a store of zero tokens
    (1, 1, 2, 40, 1, 32, 1, "kivi", 8, 16, 2),
    (1, 1, 2, 45, 1, 40, 1.58, "int8", 8, 16, 2),  # ternary; 40 channels, 8 bytes of 5 codes
]


@needs_kernel
@pytest.mark.parametrize(
    ("batch", "kv_heads", "g", "stored", "window", "dim", "bits", "layout", "group", "block_n", "splits"), CASES
)
def test_kernel_matches_reference(batch, kv_heads, g, stored, window, dim, bits, layout, group, block_n, splits):
    query, keys, values, rk, rv = make_layer(batch, kv_heads, g, stored, window, dim, bits, layout, group)
    scale = dim**-0.5
    want = decode_attention_reference(query, keys, values, rk, rv, scale)
    args = (query.to(KERNEL_DEVICE), to_device(keys), to_device(values), rk.to(KERNEL_DEVICE), rv.to(KERNEL_DEVICE))
    got = decode_attention_triton(*args, scale, block_n=block_n, splits=splits)
    assert got.shape == (batch, kv_heads * g, 1, dim) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), want, **TOLERANCE[torch.float32])


@needs_kernel
def test_kernel_masks_padding_and_whole_splits():
    """Left padding that blanks the first split of sample 1 (its max stays -inf), a masked residual token."""
    query, keys, values, rk, rv = make_layer(2, 2, 3, 64, 4, 32, 2, "kivi", 16, seed=1)
    mask = torch.ones(2, 68, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, :40] = False
    mask[1, 66] = False
    want = decode_attention_reference(query, keys, values, rk, rv, 0.2, mask)
    args = (query.to(KERNEL_DEVICE), to_device(keys), to_device(values), rk.to(KERNEL_DEVICE), rv.to(KERNEL_DEVICE))
    got = decode_attention_triton(*args, 0.2, mask.to(KERNEL_DEVICE), block_n=16, splits=2)
    torch.testing.assert_close(got.cpu(), want, **TOLERANCE[torch.float32])
    unmasked = decode_attention_reference(query, keys, values, rk, rv, 0.2)
    assert not torch.allclose(want, unmasked)  # the mask mattered
    only = decode_attention_reference(query, keys, values, rk, rv, 0.2, mask.long())  # 0/1 masks alike
    assert torch.equal(only, want)


@needs_kernel
def test_kernel_takes_bfloat16_in_its_dtype():
    query, keys, values, rk, rv = make_layer(2, 2, 2, 40, 3, 64, 4, "kivi", 8, torch.bfloat16, seed=2)
    want = decode_attention_reference(query, keys, values, rk, rv, 0.125)
    args = (query.to(KERNEL_DEVICE), to_device(keys), to_device(values), rk.to(KERNEL_DEVICE), rv.to(KERNEL_DEVICE))
    got = decode_attention_triton(*args, 0.125, block_n=16, splits=2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.cpu(), want, **TOLERANCE[torch.bfloat16])


MIXED_CASES = [  # batch, kv heads, G, blocks, group, window, dim, wide channels, salient tokens, their bits, splits
    (2, 2, 3, 2, 16, 3, 16, 6, 3, 2, 2),
    (1, 1, 4, 3, 16, 0, 32, 16, 0, 4, None),  # no residual, no salient tokens
    (2, 1, 2, 1, 16, 2, 16, 0, 16, 8, 1),  # every key channel narrow, every token salient
    (1, 2, 7, 2, 24, 5, 40, 40, 5, 2, 3),  # every channel wide; blocks of 24 in tiles of 16; head dim 40
]


def make_mixed(batch, kv_heads, group_heads, blocks, group, window, dim, wide, salient, bits, dtype=torch.float32):
    """query, a VidKV store of `blocks` blocks, residual keys and values, and a key mask with a few holes."""
    g = torch.Generator().manual_seed(blocks * dim + window)
    n = blocks * group
    query = (2 * torch.randn(batch, 1, kv_heads * group_heads, dim, generator=g)).to(dtype).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, n + window, dim, generator=g) for _ in range(2))
    k[..., 3] += 4
    layout = MixedLayout(dim, group, wide, salient, bits)
    store = layout.encode(k[..., :n, :], v[..., :n, :], torch.rand(batch, n, generator=g))
    mask = torch.rand(batch, n + window, generator=g) > 0.15
    return query, store, k[..., n:, :].to(dtype), v[..., n:, :].to(dtype), mask


def mixed_to_device(store: MixedStore) -> MixedStore:
    return store.batch_map(lambda t: t.to(KERNEL_DEVICE))


@needs_kernel
@pytest.mark.parametrize(
    ("batch", "kv_heads", "g", "blocks", "group", "window", "dim", "wide", "salient", "bits", "splits"), MIXED_CASES
)
def test_mixed_kernel_matches_reference(batch, kv_heads, g, blocks, group, window, dim, wide, salient, bits, splits):
    """VidKV's store: the kernel dots each block's query in that block's key basis with the stored codes and
    takes each token's value from its plain or salient row; the reference dequantizes the store."""
    query, store, rk, rv, mask = make_mixed(batch, kv_heads, g, blocks, group, window, dim, wide, salient, bits)
    want = mixed_attention_reference(query, store, rk, rv, 0.3, mask)
    args = (query.to(KERNEL_DEVICE), mixed_to_device(store), rk.to(KERNEL_DEVICE), rv.to(KERNEL_DEVICE))
    got = mixed_attention_triton(*args, 0.3, mask.to(KERNEL_DEVICE), block_n=16, splits=splits)
    assert got.shape == (batch, kv_heads * g, 1, dim)
    torch.testing.assert_close(got.cpu(), want, **TOLERANCE[torch.float32])
    unmasked = mixed_attention_triton(*args, 0.3, block_n=16, splits=splits)
    torch.testing.assert_close(
        unmasked.cpu(), mixed_attention_reference(query, store, rk, rv, 0.3), **TOLERANCE[torch.float32]
    )


@needs_kernel
def test_mixed_kernel_takes_bfloat16_and_never_dequantizes(monkeypatch):
    def refused(_):
        raise AssertionError("the kernel path dequantized the store")

    query, store, rk, rv, mask = make_mixed(2, 2, 2, 2, 16, 3, 32, 16, 2, 2, torch.bfloat16)
    want = mixed_attention_reference(query, store, rk, rv, 0.125, mask)
    monkeypatch.setattr(quant, "dequantize", refused)
    args = (query.to(KERNEL_DEVICE), mixed_to_device(store), rk.to(KERNEL_DEVICE), rv.to(KERNEL_DEVICE))
    got = mixed_attention(*args, 0.125, key_mask=mask.to(KERNEL_DEVICE), backend="triton")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.cpu(), want, **TOLERANCE[torch.bfloat16])


def test_reference_is_attention_over_dequantized_store_then_residual():
    """The reference against per-head softmax attention with the KV heads repeated to the query heads (GQA)."""
    query, keys, values, rk, rv = make_layer(2, 2, 3, 32, 4, 16, 4, "kivi", 16, seed=3)
    k = torch.cat([dequantize(keys), rk], dim=-2).repeat_interleave(3, dim=1)
    v = torch.cat([dequantize(values), rv], dim=-2).repeat_interleave(3, dim=1)
    want = torch.softmax(query @ k.transpose(-1, -2) * 0.25, dim=-1) @ v
    torch.testing.assert_close(decode_attention_reference(query, keys, values, rk, rv, 0.25), want)


@needs_kernel
def test_kernel_never_dequantizes_the_store(monkeypatch):
    def refused(_):
        raise AssertionError("the kernel path dequantized the store")

    monkeypatch.setattr(kv_attention, "dequantize", refused)
    query, keys, values, rk, rv = make_layer(1, 1, 2, 16, 1, 16, 2, "kivi", 16)
    args = (query.to(KERNEL_DEVICE), to_device(keys), to_device(values), rk.to(KERNEL_DEVICE), rv.to(KERNEL_DEVICE))
    assert decode_attention(*args, 0.25, backend="triton").shape == (1, 2, 1, 16)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: {**a, "query": a["query"].expand(-1, -1, 2, -1)}, r"one decode step; got \(1, 4, 2, 16\)"),
        (lambda a: {**a, "residual_values": a["residual_values"][..., :1, :]}, "residual keys and values must be"),
        (lambda a: {**a, "query": a["query"][:, :3]}, "with a multiple of its kv heads"),
        (lambda a: {**a, "values": None}, "keys and values must both be stores or both be None"),
        (lambda a: {**a, "values": quantize(torch.randn(1, 2, 32, 16), 2, 16, "token")}, "stored keys"),
        (lambda a: {**a, "key_mask": torch.ones(1, 17, dtype=torch.bool)}, r"key_mask must be .* = \(1, 18\)"),
        (
            lambda a: (
                {**a, "keys": None, "values": None, "residual_keys": a["residual_keys"][..., :0, :]}
                | {"residual_values": a["residual_values"][..., :0, :]}
            ),
            "no keys to attend to",
        ),
    ],
)
def test_refuses_operands_of_other_shapes(change, match):
    query, keys, values, rk, rv = make_layer(1, 2, 2, 16, 2, 16, 2, "kivi", 16)
    args = dict(query=query, keys=keys, values=values, residual_keys=rk, residual_values=rv, scale=0.25)
    with pytest.raises(ValueError, match=match):
        decode_attention(**change(args), backend="torch")


# Run in a fresh process without TRITON_INTERPRET, where `@triton.jit` gives compilable kernels; the launches are
# recorded, not run: KIVI's layout at 2 bits and int8's, bf16 queries with GQA, a padding mask; ternary codes; VidKV's.
COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import inspect
    from unittest import mock

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from tokred.kernels import kv_attention
    from tokred.kv import MixedLayout, quantize

    names = ("_split_kernel", "_mixed_split_kernel", "_merge_kernel")
    kernels = {name: getattr(kv_attention, name) for name in names}
    query = torch.randn(2, 28, 1, 128, dtype=torch.bfloat16)
    k, v = torch.randn(2, 2, 4, 256 + 20, 128, dtype=torch.bfloat16)
    mask = torch.ones(2, 276, dtype=torch.bool)
    stores = [
        (quantize(k[..., :256, :], bits, 32, key_axis), quantize(v[..., :256, :], bits, 32, "token"))
        for bits, key_axis in ((2, "channel"), (8, "token"), (1.58, "channel"))
    ]
    stores.append(MixedLayout(128, 128, 64, 13, 2).encode(k[..., :256, :], v[..., :256, :], torch.rand(2, 256)))
    for store in stores:
        with mock.patch.multiple(kv_attention, **dict.fromkeys(names, mock.DEFAULT)) as launchers:
            if isinstance(store, tuple):
                kv_attention.decode_attention_triton(query, *store, k[..., 256:, :], v[..., 256:, :], 0.1, mask)
            else:
                kv_attention.mixed_attention_triton(query, store, k[..., 256:, :], v[..., 256:, :], 0.1, mask)
        for name, kernel in kernels.items():
            launched = launchers[name].__getitem__.return_value.call_args
            if launched is None:
                continue
            args, meta = launched  # kernel[grid](*args, **meta)
            params = [param for param in inspect.signature(kernel.fn).parameters if param not in meta]
            signature = dict(zip(params, map(mangle_type, args), strict=True)) | dict.fromkeys(meta, "constexpr")
            compiled = triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"], name
            print(name, type(store).__name__, "compiled for sm_90")
    """
)


@needs_triton
def test_kernels_compile_for_hopper():
    """The compiled path builds to sm_90 binaries without a GPU (triton ships ptxas), as launched for bf16 GQA."""
    assert compile_for_hopper(COMPILE_FOR_HOPPER).count("compiled for sm_90") == 8


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts calls of the Triton path through the public dispatcher."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return decode_attention_triton(*args, **kwargs)

    monkeypatch.setattr(kv_attention, "decode_attention_triton", counted)
    return calls


@needs_kernel
def test_auto_runs_kernel_where_it_can_and_torch_forces_reference(kernel_calls):
    query, keys, values, rk, rv = make_layer(1, 2, 2, 16, 2, 16, 2, "kivi", 16)
    args = (query.to(KERNEL_DEVICE), to_device(keys), to_device(values), rk.to(KERNEL_DEVICE), rv.to(KERNEL_DEVICE))
    got = decode_attention(*args, 0.25)
    assert kernel_calls == [1]
    want = decode_attention(*args, 0.25, backend="torch")
    assert kernel_calls == [1]
    torch.testing.assert_close(got, want, **TOLERANCE[torch.float32])


def test_auto_falls_back_to_reference_without_gpu_or_interpreter(monkeypatch, kernel_calls):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    query, keys, values, rk, rv = make_layer(1, 2, 2, 16, 2, 16, 8, "int8", 16)
    got = decode_attention(query, keys, values, rk, rv, 0.25)
    assert torch.equal(got, decode_attention_reference(query, keys, values, rk, rv, 0.25))
    assert kernel_calls == []
    if dispatch.triton is not None:
        with pytest.raises(RuntimeError, match="backend='triton' cannot run here: tensors on cpu"):
            decode_attention(query, keys, values, rk, rv, 0.25, backend="triton")
