"""tokred.kv's bottom layer: bit packing, group-wise quantization, and the quantize-and-pack kernels.

The kernels run in triton's CPU interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET=1) and must
match the torch reference byte for byte.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
from conftest import compile_for_hopper

from tokred.kernels import dispatch, kv_pack
from tokred.kernels.kv_pack import quantize_pack, quantize_pack_triton
from tokred.kv import (
    AXES,
    WIDTHS,
    code_levels,
    dequantize,
    pack,
    pack_ternary,
    per_byte,
    quantize,
    unpack,
    unpack_ternary,
)

INTERPRETED = dispatch.interpreting()
needs_triton = pytest.mark.skipif(dispatch.triton is None, reason="needs triton")
KERNEL_DEVICE = "cpu" if INTERPRETED else "cuda"
needs_kernel = pytest.mark.skipif(
    dispatch.triton is None or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs triton, and a CUDA GPU or TRITON_INTERPRET=1 for its CPU interpreter, set before triton's first "
    "import (tests/conftest.py sets it without a GPU, unless TRITON_INTERPRET is already set, e.g. to 0)",
)


def pack_any(codes: torch.Tensor, bits: float) -> torch.Tensor:
    return pack_ternary(codes) if bits == 1.58 else pack(codes, bits)


def unpack_any(packed: torch.Tensor, bits: float, n: int) -> torch.Tensor:
    return unpack_ternary(packed, n) if bits == 1.58 else unpack(packed, bits, n)


@pytest.mark.parametrize("n", [1, 4, 5, 7, 13, 33])
@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_round_trip_is_exact(bits, n):
    levels = code_levels(bits)
    codes = torch.randint(0, levels, (2, 3, n), generator=torch.Generator().manual_seed(n))
    packed = pack_any(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, -(-n // per_byte(levels)))
    assert torch.equal(unpack_any(packed, bits, n), codes.to(torch.uint8))


def test_codes_per_byte():
    assert [per_byte(code_levels(bits)) for bits in WIDTHS] == [8, 5, 4, 2, 1]


@pytest.mark.parametrize(
    ("bits", "codes", "want"),
    [
        (2, [1, 2, 3, 0, 3, 1], [1 + 2 * 4 + 3 * 16, 3 + 1 * 4]),  # code i at bits 2 * (i % 4), zero-padded
        (4, [0xA, 0x3, 0xF], [0x3A, 0x0F]),
        (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0b10001101, 1]),
        (8, [0, 255, 7], [0, 255, 7]),
        (1.58, [2, 1, 0, 2, 1, 2, 2], [2 + 3 + 0 + 2 * 27 + 81, 2 + 2 * 3]),  # base-3 digits, c0 lowest
        (1.58, [2, 2, 2, 2, 2], [242]),  # the largest ternary byte, 3**5 - 1
    ],
)
def test_pack_by_hand(bits, codes, want):
    packed = pack_any(torch.tensor(codes), bits)
    assert packed.tolist() == want
    assert unpack_any(packed, bits, len(codes)).tolist() == codes


@pytest.mark.parametrize("bits", [0, 3, 1.58, 16])
def test_pack_refuses_other_widths(bits):
    with pytest.raises(ValueError, match=r"bits must be one of 1, 2, 4, 8 \(pack_ternary for 3-level codes\)"):
        pack(torch.zeros(4, dtype=torch.long), bits)
    with pytest.raises(ValueError, match="bits must be one of 1, 2, 4, 8"):
        unpack(torch.zeros(1, dtype=torch.uint8), bits, 4)


def test_pack_refuses_codes_out_of_range_or_not_integers():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\) for 4-level packing; got values in \[0, 4\]"):
        pack(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 2\).*\[-1, 1\]"):
        pack(torch.tensor([1, -1]), 1)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\)"):
        pack_ternary(torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="codes must be an integer tensor, got torch.float32"):
        pack(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="7 codes take 2 bytes at 4 a byte, but the last dimension has 3"):
        unpack(torch.zeros(3, dtype=torch.uint8), 2, 7)
    with pytest.raises(ValueError, match="packed codes must be uint8, got torch.int64"):
        unpack_ternary(torch.zeros(3, dtype=torch.long), 15)


def kv_like(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Random (..., n, d) with the groups that test the rounding: token 0 at 1000 with a range far below float16's
    step there, token 1 and channel 1 constant, channel 2 at 500 with a small range."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(shape, generator=g)
    x[..., 0, :] = 1000 + 0.01 * torch.randn(x[..., 0, :].shape, generator=g)
    x[..., 1, :] = -0.75
    x[..., :, 1] = 2.5
    x[..., :, 2] = 500 + 0.01 * torch.randn(x[..., :, 2].shape, generator=g)
    return x.to(dtype)


def per_value(stat: torch.Tensor, group: int, axis: str) -> torch.Tensor:
    """A per-group scale or zero repeated to the shape of the values it covers."""
    return stat.float().repeat_interleave(group, dim=-2 if axis == "channel" else -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", WIDTHS)
def test_dequantize_is_within_half_a_step(bits, axis, dtype):
    x = kv_like((2, 32, 48), dtype)
    q = quantize(x, bits, 8, axis)
    assert q.packed.dtype == torch.uint8 and q.scale.dtype == q.zero.dtype == torch.float16
    assert q.scale.shape == q.zero.shape == ((2, 4, 48) if axis == "channel" else (2, 32, 6))
    got = dequantize(q)
    assert got.shape == x.shape and got.dtype == torch.float32
    scale = per_value(q.scale, 8, axis)
    assert torch.all((got - x.float()).abs() <= scale / 2 * (1 + 1e-5) + 1e-6 * x.float().abs())
    assert torch.all(per_value(q.zero, 8, axis) <= x.float())  # the zero rounded down, below the group's min


def test_round_to_nearest_level_ties_to_even():
    x = torch.tensor([[0.0, 3.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0]])  # 2 bits over [0, 3]: scale 1, zero 0
    q = quantize(x, 2, 8, "token")
    assert (q.scale.item(), q.zero.item()) == (1.0, 0.0)
    assert unpack(q.packed, 2, 8).tolist() == [[0, 3, 0, 2, 2, 3, 1, 2]]


@pytest.mark.parametrize(
    ("shape", "group", "axis", "match"),
    [
        (
            (2, 37, 48),
            16,
            "channel",
            r"axis='channel' groups tokens: group=16 must divide the 37 tokens \(dim -2 of "
            r"shape \(2, 37, 48\)\); allowed: 1, 37",
        ),
        (
            (37, 48),
            10,
            "token",
            "axis='token' groups channels: group=10 must divide the 48 channels .*; allowed: "
            "1, 2, 3, 4, 6, 8, 12, 16, 24, 48$",
        ),
        ((8, 8), 0, "token", "group=0 must divide the 8 channels"),
        ((8, 8), 4, "head", "axis must be one of 'channel', 'token', got 'head'"),
        ((8,), 4, "token", r"expected a \(..., tokens, channels\) tensor, got shape \(8,\)"),
    ],
)
def test_quantize_refuses_bad_groups(shape, group, axis, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(shape), 2, group, axis)


def test_quantize_refuses_other_widths_and_float16_overflow():
    with pytest.raises(ValueError, match=r"bits must be one of 1, 1.58, 2, 4, 8 \(1.58: ternary\), got 3"):
        quantize(torch.randn(4, 8), 3, 4, "token")
    with pytest.raises(ValueError, match="overflow float16 scales and zeros"):
        quantize(torch.tensor([[-1e5, 0.0]]), 2, 2, "token")


@pytest.mark.parametrize(("bits", "want"), [(1, 2.0), (1.58, 2.6), (2, 3.0), (4, 5.0), (8, 9.0)])
@pytest.mark.parametrize("axis", AXES)
def test_nbytes_counts_codes_scales_and_zeros(bits, want, axis):
    """Group 32, float16 scale and zero: bits + 32 / 32 a value (ternary 1.6 + 1, 5 codes a byte)."""
    q = quantize(torch.randn(2, 64, 160), bits, 32, axis)
    held = q.packed.numel() + 2 * q.scale.numel() + 2 * q.zero.numel()
    assert q.nbytes == held == q.packed.untyped_storage().nbytes() + 2 * q.scale.untyped_storage().nbytes()
    assert q.bits_per_value == pytest.approx(want)


KERNEL_CASES = [  # shape, group, axis, dtype, strided: n and d not multiples of the kernels' blocks
    ((37, 80), 16, "token", torch.float32, False),
    ((3, 37, 80), 10, "token", torch.float16, True),  # 10 channels a group: bytes straddle groups at 2 and 4 bits
    ((2, 5, 24), 3, "token", torch.bfloat16, False),
    ((2, 48, 80), 16, "channel", torch.float32, True),
    ((3, 30, 72), 10, "channel", torch.bfloat16, False),
]


@needs_kernel
# 64: a program takes one row or byte, several a group; 4096 (a compiled program's): several groups a program for
# some shapes, the last program's partly past the end; None: the default (the interpreter's, fewer programs)
@pytest.mark.parametrize("tile", [None, 64, 4096])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("shape", "group", "axis", "dtype", "strided"), KERNEL_CASES)
def test_kernel_matches_reference_exactly(monkeypatch, shape, group, axis, dtype, strided, bits, tile):
    if tile:
        monkeypatch.setattr(kv_pack, "TILE", tile)
    x = kv_like(shape, dtype)
    if strided:  # (..., n, H, D) -> (..., H, n, D) views, as transformers' layers pass keys and values
        x = x.reshape(*shape[:-2], shape[-2], 2, shape[-1] // 2).transpose(-3, -2)
    x = x.to(KERNEL_DEVICE)
    got, want = quantize_pack_triton(x, bits, group, axis), quantize(x, bits, group, axis)
    for name in ("packed", "scale", "zero"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (got.bits, got.group, got.axis, got.shape) == (want.bits, want.group, want.axis, want.shape)


@needs_kernel
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("bits", [1, 1.58, 8])
def test_kernel_serves_every_width(bits, axis):
    x = kv_like((2, 24, 40), seed=1).to(KERNEL_DEVICE)
    got, want = quantize_pack_triton(x, bits, 8, axis), quantize(x, bits, 8, axis)
    assert all(torch.equal(getattr(got, name), getattr(want, name)) for name in ("packed", "scale", "zero"))


@needs_kernel
def test_kernel_ties_to_even_and_takes_empty_blocks():
    x = torch.tensor([[0.0, 3.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0]], device=KERNEL_DEVICE)
    assert unpack(quantize_pack_triton(x, 2, 8).packed.cpu(), 2, 8).tolist() == [[0, 3, 0, 2, 2, 3, 1, 2]]
    empty = quantize_pack_triton(torch.zeros(2, 0, 16, device=KERNEL_DEVICE), 4, 8, "channel")
    assert empty.packed.shape == (2, 0, 8) and empty.scale.shape == (2, 0, 16) and empty.nbytes == 0


# Run in a fresh process without TRITON_INTERPRET, where `@triton.jit` gives compilable kernels; the launches are
# recorded, not run. The PTX must divide with IEEE rounding (div.rn, not the approximate div.full) to match torch.
COMPILE_FOR_HOPPER = textwrap.dedent(
    """
    import inspect
    from unittest import mock

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    from tokred.kernels import kv_pack

    x = torch.randn(2, 8, 256, 128, dtype=torch.bfloat16)
    for axis, name in (("token", "_token_kernel"), ("channel", "_channel_kernel")):
        kernel = getattr(kv_pack, name)
        with mock.patch.object(kv_pack, name) as launcher:
            kv_pack.quantize_pack_triton(x, 2, 32, axis)
        args, meta = launcher.__getitem__.return_value.call_args  # kernel[grid](*args, **meta)
        names = [param for param in inspect.signature(kernel.fn).parameters if param not in meta]
        signature = dict(zip(names, map(mangle_type, args), strict=True)) | dict.fromkeys(meta, "constexpr")
        compiled = triton.compile(ASTSource(kernel, signature, meta), target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and "div.rn.f32" in compiled.asm["ptx"], name
        assert "div.full" not in compiled.asm["ptx"], name
        print(name, "compiled for sm_90")
    """
)


@needs_triton
def test_kernels_compile_for_hopper():
    """The compiled path builds to an sm_90 binary without a GPU (triton ships ptxas), as launched for bf16."""
    assert compile_for_hopper(COMPILE_FOR_HOPPER).count("compiled for sm_90") == 2


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts calls of the Triton path through the public dispatcher."""
    calls: list[int] = []

    def counted(*args, **kwargs):
        calls.append(1)
        return quantize_pack_triton(*args, **kwargs)

    monkeypatch.setattr(kv_pack, "quantize_pack_triton", counted)
    return calls


@needs_kernel
def test_auto_runs_kernel_where_it_can_and_torch_forces_reference(kernel_calls):
    x = kv_like((16, 32)).to(KERNEL_DEVICE)
    got = quantize_pack(x, 2, 16)
    assert kernel_calls == [1] and got.axis == "token"
    assert torch.equal(quantize_pack(x, 2, 16, backend="torch").packed, got.packed) and kernel_calls == [1]


def test_auto_falls_back_to_reference_without_gpu_or_interpreter(monkeypatch, kernel_calls):
    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    x = kv_like((16, 32))
    assert torch.equal(quantize_pack(x, 4, 8, "channel").packed, quantize(x, 4, 8, "channel").packed)
    assert kernel_calls == []


def test_imports_and_falls_back_without_triton(monkeypatch):
    for name in ("triton", "triton.language"):
        monkeypatch.setitem(sys.modules, name, None)  # `import triton` now raises ImportError
    fresh = {}
    for name in ("tokred.kernels.dispatch", "tokred.kernels.kv_pack"):  # new copies, each seeing the one before
        spec = importlib.util.find_spec(name)
        fresh[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, fresh[name])
        spec.loader.exec_module(fresh[name])
    assert not hasattr(fresh["tokred.kernels.kv_pack"], "_token_kernel")
    x = kv_like((16, 32))
    got = fresh["tokred.kernels.kv_pack"].quantize_pack(x, 2, 8)
    assert torch.equal(got.packed, quantize(x, 2, 8, "token").packed)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        fresh["tokred.kernels.kv_pack"].quantize_pack(x, 2, 8, backend="triton")


def test_an_empty_block_quantizes_to_an_empty_store():
    q = quantize(torch.zeros(2, 0, 16), 2, 4, "token")
    assert q.packed.shape == (2, 0, 4) and dequantize(q).shape == (2, 0, 16)
