"""tokred.weights' numeric core: 3-bit packing, group-wise weight quantization, and QuantLinear.

QuantLinear runs `tokred.kernels.dequant_matmul` (the Triton kernels, in triton's CPU interpreter without a GPU:
tests/conftest.py sets TRITON_INTERPRET=1), so its outputs are held to the dequantized weight's float32 linear.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokred.kernels.dequant_matmul import GEMV_ROWS
from tokred.kv import quantize
from tokred.kv.packing import pack3, unpack3
from tokred.weights import WEIGHT_WIDTHS, QuantizedWeight, dequantize_weight, quantize_weight
from tokred.weights.linear import QuantLinear
from tokred.weights.quant import unpack_weight_codes

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}  # float32 on both sides, summed in another order


@pytest.mark.parametrize("n", [1, 3, 8, 13, 64])
def test_pack3_round_trip_is_exact(n):
    codes = torch.randint(0, 8, (2, 3, n), generator=torch.Generator().manual_seed(n))
    packed = pack3(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, -(-3 * n // 8))
    assert torch.equal(unpack3(packed, n), codes.to(torch.uint8))


def test_pack3_puts_eight_codes_in_three_bytes_as_a_little_endian_stream():
    codes = torch.randint(0, 8, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    words = [sum(c << 3 * i for i, c in enumerate(codes[j : j + 8])) for j in (0, 8)]
    assert pack3(torch.tensor(codes)).tolist() == [b for word in words for b in word.to_bytes(3, "little")]


def test_pack3_refuses_codes_out_of_range_and_wrong_lengths():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\) for 8-level packing; got values in \[0, 8\]"):
        pack3(torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="9 3-bit codes take 4 bytes, but the last dimension has 3"):
        unpack3(torch.zeros(3, dtype=torch.uint8), 9)


def grid_weight(bits: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight lying exactly on a grid, and its codes, scales and zeros: float16 zeros, power-of-two scales, and
    codes that reach both ends of every group, so min/max quantization must find exactly this grid."""
    g = torch.Generator().manual_seed(seed)
    out, groups, top = 6, 4, 2**bits - 1
    codes = torch.randint(0, top + 1, (out, groups, group), generator=g)
    codes[..., 0], codes[..., -1] = 0, top
    zero = torch.randn(out, groups, generator=g).half()
    scale = (2.0 ** torch.randint(-9, -3, (out, groups), generator=g)).half()
    w = zero.float()[..., None] + codes * scale.float()[..., None]  # exact in float32
    return w.reshape(out, groups * group), codes.reshape(out, groups * group), scale, zero


@pytest.mark.parametrize("group", [8, 16])
@pytest.mark.parametrize("bits", WEIGHT_WIDTHS)
def test_quantize_weight_finds_the_grid_a_weight_lies_on(bits, group):
    w, codes, scale, zero = grid_weight(bits, group)
    q = quantize_weight(w, bits, group)
    assert (q.bits, q.group, q.shape) == (bits, group, w.shape)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (w.shape[0], w.shape[1] * bits // 8)
    assert torch.equal(unpack_weight_codes(q), codes.to(torch.uint8))
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    assert torch.equal(dequantize_weight(q), w)


def weight_like(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random weights with the groups that test the rounding: a constant row, an outlier column, a row at 300 with
    a range far below float16's step there."""
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(shape, generator=g)
    w[1] = -0.75
    w[:, 5] = 4.0
    w[2] = 300 + 0.01 * torch.randn(shape[1], generator=g)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", WEIGHT_WIDTHS)
def test_dequantized_weight_is_within_half_a_step(bits, dtype):
    w = weight_like((8, 96), dtype)
    q = quantize_weight(w, bits, 32)
    assert q.scale.dtype == q.zero.dtype == torch.float16 and q.scale.shape == q.zero.shape == (8, 3)
    got = dequantize_weight(q)
    assert got.dtype == torch.float32 and got.shape == w.shape
    scale, zero = (t.float().repeat_interleave(32, dim=-1) for t in (q.scale, q.zero))
    assert torch.all((got - w.float()).abs() <= scale / 2 * (1 + 1e-5) + 1e-6 * w.float().abs())
    assert torch.all(zero <= w.float())  # the zero rounded down, below the group's min


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_binary_widths_match_the_kv_quantizer_byte_for_byte(bits):
    """A weight row is a KV token: groups of input channels quantized alike (values' layout, axis="token")."""
    w = weight_like((8, 96), torch.float32)
    q, kv = quantize_weight(w, bits, 32), quantize(w, bits, 32, "token")
    assert torch.equal(q.packed, kv.packed) and torch.equal(q.scale, kv.scale) and torch.equal(q.zero, kv.zero)


@pytest.mark.parametrize(
    ("bits", "group", "want"), [(4, 64, 4.5), (2, 32, 3.0), (3, 64, 3.5), (3, 128, 3.25), (8, 128, 8.25)]
)
def test_bits_per_value_counts_codes_scales_and_zeros(bits, group, want):
    """Codes of `bits`, and a float16 scale and zero per `group` weights: bits + 32 / group a weight."""
    q = quantize_weight(torch.randn(24, 256), bits, group)
    assert q.nbytes == 24 * 256 * bits // 8 + 2 * 2 * 24 * 256 // group
    assert q.bits_per_value == pytest.approx(want)


@pytest.mark.parametrize(
    ("w", "bits", "group", "error", "match"),
    [
        (torch.randn(4, 64), 16, 32, ValueError, r"bits must be one of 2, 3, 4, 8 \(16: leave the layer unquantized\)"),
        (torch.randn(4, 64), 1, 32, ValueError, "bits must be one of 2, 3, 4, 8"),
        (torch.randn(4, 64), 4.0, 32, ValueError, "bits must be one of 2, 3, 4, 8.*got 4.0"),
        (torch.randn(4, 64), True, 32, ValueError, "bits must be one of 2, 3, 4, 8"),
        (
            torch.randn(4, 48),
            4,
            32,
            ValueError,
            "group=32 must divide the 48 input channels; allowed: 1, 2, 3, 4, 6, 8, 12, 16, 24, 48$",
        ),
        (torch.randn(4, 64), 4, 0, ValueError, "group=0 must divide the 64 input channels"),
        (torch.randn(2, 4, 64), 4, 32, ValueError, r"2-D \(out_features, in_features\) weight, got shape \(2, 4, 64\)"),
        (torch.ones(4, 64, dtype=torch.long), 4, 32, TypeError, "floating-point tensor, got torch.int64"),
        (torch.tensor([[-1e5, 0.0]]), 2, 2, ValueError, "overflow float16 scales and zeros"),
    ],
)
def test_quantize_weight_refuses_bad_input(w, bits, group, error, match):
    with pytest.raises(error, match=match):
        quantize_weight(w, bits, group)


def make_linear(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(96, 40, bias=bias)


# the most rows the GEMV path takes, and one more (the GEMM path), each with a batch dimension
@pytest.mark.parametrize(("rows", "bias"), [((1, GEMV_ROWS), True), ((3, GEMV_ROWS + 1), False)])
@pytest.mark.parametrize("bits", WEIGHT_WIDTHS)
def test_quant_linear_is_the_linear_of_its_dequantized_weight(bits, rows, bias):
    linear = make_linear(bias)
    layer = QuantLinear.from_linear(linear, bits, 32)
    x = torch.randn(*rows, 96, generator=torch.Generator().manual_seed(1))
    want = F.linear(x, dequantize_weight(quantize_weight(linear.weight, bits, 32)), linear.bias)
    got = layer(x)
    assert got.shape == (*rows, 40) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, **TOLERANCE)


def test_quant_linear_state_dict_round_trips():
    layer = QuantLinear.from_linear(make_linear(), 3, 32)
    assert set(layer.state_dict()) == {"packed", "scale", "zero", "bias"}
    blank = QuantLinear(quantize_weight(torch.zeros(40, 96), 3, 32), torch.zeros(40))
    blank.load_state_dict(layer.state_dict())
    x = torch.randn(4, 96)
    assert torch.equal(blank(x), layer(x))


def test_quant_linear_keeps_its_float16_scales_through_a_dtype_cast():
    layer = QuantLinear.from_linear(make_linear(), 4, 32)
    before = layer.quantized
    layer.to(torch.bfloat16)
    after = layer.quantized
    assert after.scale.dtype == after.zero.dtype == torch.float16
    assert torch.equal(after.scale, before.scale) and torch.equal(after.zero, before.zero)
    assert layer.bias.dtype == torch.bfloat16  # the bias follows the model's dtype, as nn.Linear's does


def test_quant_linear_reports_its_bytes_and_widths():
    layer = QuantLinear.from_linear(make_linear(), 4, 32)
    assert layer.nbytes() == layer.quantized.nbytes + 40 * 4 == 40 * 96 // 2 + 2 * 2 * 40 * 3 + 40 * 4
    assert QuantLinear.from_linear(make_linear(bias=False), 4, 32).nbytes() == layer.quantized.nbytes
    assert repr(layer) == "QuantLinear(in_features=96, out_features=40, bias=True, bits=4, group=32)"
    assert isinstance(layer.quantized, QuantizedWeight)


def test_quant_linear_refuses_what_it_cannot_hold():
    with pytest.raises(TypeError, match="from_linear takes an nn.Linear, got Conv1d"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1), 4, 2)
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        QuantLinear.from_linear(make_linear(), 16, 32)
    with pytest.raises(ValueError, match=r"bias must be \(40,\), one per output feature, got \(41,\)"):
        QuantLinear(quantize_weight(torch.randn(40, 96), 4, 32), torch.zeros(41))
    with pytest.raises(TypeError, match="weight must be a tokred.weights.QuantizedWeight, got Tensor"):
        QuantLinear(torch.randn(40, 96))
