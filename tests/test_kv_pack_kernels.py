"""The quantize-and-pack kernels on the KV cache's write path: VidKV's mixed layout by its Triton steps
(`tokred.kernels.kv_pack_mixed`) against its torch reference (`tokred.kv.mixed`), byte for byte, and a cache filled
through the kernels (triton's CPU interpreter here, as tests/conftest.py sets it) against one filled by the
reference, for every layout."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch
from conftest import _tiny, compile_for_hopper

from tokred import KIVI, Int8, compat
from tokred.kernels import dispatch, kv_pack, kv_pack_mixed
from tokred.kv import MixedLayout, Quantized, cache_for
from tokred.kv.mixed import binary, pairwise_sum
from tokred.methods import VidKV

needs_kernel = pytest.mark.skipif(
    dispatch.triton is None or not (dispatch.interpreting() or torch.cuda.is_available()),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 for its CPU interpreter, set before triton's first "
    "import (tests/conftest.py sets it without a GPU)",
)
KERNEL_DEVICE = "cpu" if dispatch.interpreting() else "cuda"


def assert_same_store(got, want) -> None:
    """Two stores hold the same tensors, byte for byte (codes, scales, zeros, masks), of the same layouts."""
    assert type(got) is type(want)
    for field in dataclasses.fields(want):
        a, b = getattr(got, field.name), getattr(want, field.name)
        if isinstance(b, Quantized):
            assert (a.bits, a.group, a.axis, a.shape) == (b.bits, b.group, b.axis, b.shape), field.name
            for name in ("packed", "scale", "zero"):
                x, y = getattr(a, name), getattr(b, name)
                assert x.dtype == y.dtype and torch.equal(x, y), f"{field.name}.{name}"
        elif isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), field.name
        else:
            assert a == b, field.name


def tied_keys(shape: tuple[int, int, int, int], wide: int, seed: int) -> torch.Tensor:
    """Random keys (B, H, n, d) whose widest channels, wide + 2 of them (every other channel from 0), share one
    range in every block (copies and negations of one channel, 8 times wider than the rest), so the ranking's cut
    falls inside a tie; channels 1 and 3 are constant (a tie at range 0)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(shape, generator=g)
    base = 8 * torch.randn(shape[:-1], generator=g)
    for k, channel in enumerate(range(0, min(2 * (wide + 2), shape[-1]), 2)):
        keys[..., channel] = base if k % 2 else -base
    keys[..., 1], keys[..., 3] = 0.5, -2.0
    return keys


CASES = [  # (B, H, n, d), group, anomalous, salient, salient bits, dtype, strided
    ((2, 3, 36, 20), 12, 3, 3, 4, torch.float32, True),  # 3 blocks of 12 tokens, 20 channels: no kernel block fits
    ((1, 2, 32, 16), 16, 6, 4, 2, torch.bfloat16, False),
    ((2, 1, 24, 13), 8, 0, 0, 8, torch.float16, True),  # no wide channels, no salient tokens
    ((1, 2, 10, 9), 5, 9, 5, 2, torch.float32, False),  # every channel wide, every token salient
]


@needs_kernel
# 64: programs take a byte or a few tokens each, several a group; 2048: several blocks or groups a program, the last
# program's partly past the end; None: the default (few programs in the interpreter, none past the end)
@pytest.mark.parametrize("tile", [None, 64, 2048])
@pytest.mark.parametrize(("shape", "group", "wide", "salient", "bits", "dtype", "strided"), CASES)
def test_mixed_encode_matches_reference_exactly(monkeypatch, tile, shape, group, wide, salient, bits, dtype, strided):
    if tile:
        monkeypatch.setattr(kv_pack, "TILE", tile)
    batch, heads, n, dim = shape
    keys = tied_keys(shape, wide, seed=n)
    g = torch.Generator().manual_seed(dim)
    values = 3 * torch.randn(shape, generator=g)
    values[..., 2] = 1.25  # a constant channel
    scores = torch.rand(batch, n, generator=g)
    if strided:  # (B, n, H, d) -> (B, H, n, d) views, as transformers' layers pass keys and values
        keys, values = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (keys, values))
    keys, values = (x.to(dtype=dtype, device=KERNEL_DEVICE) for x in (keys, values))
    layout = MixedLayout(dim, group, wide, salient, bits)
    want = layout.encode(keys, values, scores.to(KERNEL_DEVICE), backend="torch")
    if 0 < wide < dim:
        ranges = keys.float().view(batch, heads, n // group, group, dim)
        ranges = (ranges.amax(3) - ranges.amin(3)).sort(-1, descending=True).values
        assert torch.equal(ranges[..., wide - 1], ranges[..., wide]), "the cut falls inside a tie"
    assert_same_store(layout.encode(keys, values, scores.to(KERNEL_DEVICE), backend="triton"), want)


@needs_kernel
@pytest.mark.parametrize("tile", [None, 64, 512])
def test_binary_kernel_matches_reference_exactly(monkeypatch, tile):
    """Groups of 5 tokens (no power of two), 11 channels; a constant group, one of signed zeros, values on the mean."""
    if tile:
        monkeypatch.setattr(kv_pack, "TILE", tile)
    x = torch.randn(2, 3, 15, 11, generator=torch.Generator().manual_seed(3))
    x[..., 5:10, 4] = 0.7
    x[..., 0:5, 6] = torch.tensor([0.0, -0.0, -0.0, 0.0, -0.0])
    x[..., 10:15, 7] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # 3 is the mean
    x = x.to(KERNEL_DEVICE)
    got, want = kv_pack_mixed.binary_triton(x, 5), binary(x, 5)
    for name in ("packed", "scale", "zero"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_pairwise_sum_adds_adjacent_pairs_level_by_level():
    """float32 rounding shows the order: 1e8 + 1 rounds back to 1e8, so where the ones meet decides the sum."""
    assert pairwise_sum(torch.tensor([1e8, 1.0, -1e8, 1.0]), 0).item() == 0.0  # (1e8 + 1) + (-1e8 + 1)
    assert pairwise_sum(torch.tensor([1e8, -1e8, 1.0, 1.0]), 0).item() == 2.0  # (1e8 - 1e8) + (1 + 1)
    assert pairwise_sum(torch.tensor([[1e8, 1.0, -1e8]]), 1).item() == 0.0  # padded to 4 with a zero
    x = torch.randn(3, 7, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pairwise_sum(x, 1), x.sum(1))


SCHEMES = {
    "int8": Int8(),
    "kivi-2": KIVI(group=8, residual=8),
    "kivi-4": KIVI(bits=4, group=8, residual=8),
    "vidkv": VidKV(salient=0.25, group=8, residual=8),
}


@pytest.fixture(scope="module")
def qwen(zoo_root):
    return _tiny("qwen2_5_vl", zoo_root)


@pytest.mark.skipif(
    dispatch.triton is None or not dispatch.interpreting(),
    reason="the tiny model runs on the CPU, where the kernels run in triton's interpreter (TRITON_INTERPRET=1)",
)
@pytest.mark.parametrize("name", list(SCHEMES))
def test_a_cache_filled_by_the_kernels_equals_one_filled_by_the_reference(qwen, monkeypatch, name):
    """A padded batch through the unpatched model (torch attention), the cache passed in: filled with `auto` (the
    kernels run, as on a GPU) and with the torch reference (`auto` where Triton cannot run), the same stores byte
    for byte in every layer and the same tokens."""
    calls: list[int] = []
    kernel = kv_pack.quantize_pack_rows_triton

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kv_pack, "quantize_pack_rows_triton", counted)
    inputs, scheme = qwen.batch(), SCHEMES[name]
    runs = []
    for reference in (False, True):
        if reference:  # as if Triton could not run here: `auto` takes the torch reference
            monkeypatch.setattr(dispatch, "interpreting", lambda: False)
        cache = cache_for(qwen.model, scheme)
        ids = qwen.model.generate(
            **inputs, max_new_tokens=3, do_sample=False, **{compat.cache_argument(qwen.model): cache}
        )
        runs.append((ids, cache, len(calls)))
    (ids, cache, kernel_calls), (reference_ids, reference, total_calls) = runs
    assert kernel_calls > 0 and total_calls == kernel_calls, "the kernels fill the first cache only"
    assert torch.equal(ids, reference_ids)
    for got, want in zip(cache.layers, reference.layers, strict=True):
        assert got.stored_length() > 0
        assert_same_store(got.store, want.store)


# Run in a fresh process without TRITON_INTERPRET, where `@triton.jit` gives compilable kernels; each step's launch
# is recorded, not run, and compiled as launched for bf16 keys and values at Qwen2.5-VL's head dim.
COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import contextlib
    import inspect
    from unittest import mock

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from tokred.kernels import kv_pack, kv_pack_mixed
    from tokred.kv import mixed

    keys, values = torch.randn(2, 1, 4, 256, 128, dtype=torch.bfloat16)
    rows = torch.arange(256).expand(1, 256)
    order, _ = mixed.rank_channels(keys, 128, 64)
    coefficients = mixed.narrow_coefficients(keys, rows, order, 64, 128)
    steps = [  # each step, and the kernels it launches
        (lambda: kv_pack_mixed.rank_channels_triton(keys, 128, 64), [(kv_pack_mixed, "_rank_kernel")]),
        (lambda: kv_pack_mixed.wide_keys_triton(keys, rows, order, 64, 128), [(kv_pack, "_channel_kernel")]),
        (lambda: kv_pack_mixed.binary_triton(coefficients, 128), [(kv_pack_mixed, "_binary_kernel")]),
        (
            lambda: kv_pack_mixed.split_values_triton(values, rows, 128, 13, 2),
            [(kv_pack, "_channel_kernel"), (kv_pack, "_token_kernel")],
        ),
    ]
    for step, kernels in steps:
        with contextlib.ExitStack() as patches:
            launchers = [patches.enter_context(mock.patch.object(module, name)) for module, name in kernels]
            step()
        for (module, name), launcher in zip(kernels, launchers, strict=True):
            kernel = getattr(module, name)
            args, meta = launcher.__getitem__.return_value.call_args  # kernel[grid](*args, **meta)
            names = [param for param in inspect.signature(kernel.fn).parameters if param not in meta]
            signature = dict(zip(names, map(mangle_type, args), strict=True)) | dict.fromkeys(meta, "constexpr")
            compiled = triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"] and "div.full" not in compiled.asm["ptx"], name
            assert name == "_rank_kernel" or "div.rn.f32" in compiled.asm["ptx"], name
            print(name, meta.get("CHANNELS", ""), "compiled for sm_90")
    """
)


@pytest.mark.skipif(dispatch.triton is None, reason="needs triton")
def test_mixed_kernels_compile_for_hopper():
    """Each step's kernel builds to an sm_90 binary without a GPU (triton ships ptxas), dividing with IEEE
    rounding as the reference does; the per-channel kernel also as it gathers the wide key channels."""
    out = compile_for_hopper(COMPILE_FOR_HOPPER)
    assert out.count("compiled for sm_90") == 5 and "_channel_kernel True compiled" in out
