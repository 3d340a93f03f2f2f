"""VidKV's mixed-precision store: keys split by channel range into 2-bit channels and 1-bit channels taken through
an FFT across channels, values ternary per channel, each block's salient tokens' values at a higher width.

A block of `group` tokens is encoded per sample and KV head:
- tokens: the block's `salient` highest-scoring tokens (per sample) are put last, the others first, each part in
  position order (`salient_mask`, one bit per token, says which were salient). Attention does not depend on the
  order of its keys, and per-channel scales do not depend on the order of a channel's tokens, so the store keeps
  this order (the fused attention permutes the key mask instead of the keys) and `dequantize` undoes it;
- keys, per channel: the channels are ranked by their range (max - min over the block's tokens, ties to the lower
  channel); the `anomalous` widest are quantized to 2 bits per channel over the block (`high`), the rest are taken
  through the orthonormal real DFT across those channels (`rdft`: per token, n real coefficients for n channels)
  and each coefficient is quantized to 1 bit per channel over the block (`low`, `binary`: two levels, the means of
  the group's values below and above its mean, summed in a fixed order). `anomalous_mask` (one bit per channel)
  says which channels were wide; a block's channels are stored wide ones first, each part in channel order;
- values, per channel: the block's non-salient tokens ternary (`values`: {min, mid, max} over those tokens, 5
  codes a byte), its salient tokens at `salient_bits` per token (`salient_values`: a scale and zero per token and
  head over its channels).

Keys read back as the inverse DFT of the coefficients' levels, so a token's error over its 1-bit channels has the
L2 norm of its coefficients' errors (the transform is orthonormal).

The functions here are the torch reference of each step of the encode (`rank_channels`, `wide_keys`, `binary`,
`split_values`); `tokred.kernels.kv_pack_mixed` has a Triton kernel for each, with the same bytes, which the layout
runs where Triton does (`backend="auto"`). Choosing the salient tokens and the DFT (`narrow_coefficients`) stay
torch on either path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import tokred.kv.quant as quant
from tokred.kernels import kv_pack_mixed
from tokred.kernels.dispatch import resolve
from tokred.kv.packing import pack, unpack
from tokred.kv.quant import TERNARY, Quantized
from tokred.kv.store import Batchwise, cat_quantized, first_quantized, map_quantized

SALIENT_BITS = (2, 4, 8)
"""Widths a salient token's values may take (per token, a scale and zero over a head's channels)."""


def rdft(x: torch.Tensor) -> torch.Tensor:
    """float32 (..., n): the orthonormal real DFT of x (..., n) along its last dimension, as n real numbers: the
    real part of bin 0, then sqrt(2) times the real and imaginary parts of each bin up to n / 2 (excluded), then the
    real part of bin n / 2 for even n. Orthonormal, so `irdft` inverts it and norms are kept."""
    n = x.shape[-1]
    if n == 0:
        return x.float()
    spectrum = torch.fft.rfft(x.float(), norm="ortho")
    inner = torch.view_as_real(spectrum[..., 1 : (n + 1) // 2]).flatten(-2) * math.sqrt(2)
    parts = [spectrum[..., :1].real, inner, spectrum[..., n // 2 :].real if n % 2 == 0 else inner[..., :0]]
    return torch.cat(parts, dim=-1)


def irdft(c: torch.Tensor) -> torch.Tensor:
    """float32 (..., n): the signal whose `rdft` is c."""
    n = c.shape[-1]
    if n == 0:
        return c.float()
    c = c.float()
    inner = torch.view_as_complex((c[..., 1 : 1 + 2 * ((n - 1) // 2)] / math.sqrt(2)).unflatten(-1, (-1, 2)))
    nyquist = [c[..., -1:].to(inner.dtype)] if n % 2 == 0 else []
    spectrum = torch.cat([c[..., :1].to(inner.dtype), inner, *nyquist], dim=-1)
    return torch.fft.irfft(spectrum, n, norm="ortho")


def pairwise_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """float32 sums of x along `dim` in a fixed order: zero-padded to a power of two, then adjacent pairs added,
    level by level. torch's own reductions leave their order (so their rounding) unspecified; a kernel can repeat
    this one exactly."""
    x = x.float().movedim(dim, -1)
    size = x.shape[-1]
    x = F.pad(x, (0, (1 << max(size - 1, 0).bit_length()) - size))
    while x.shape[-1] > 1:
        x = x[..., 0::2] + x[..., 1::2]
    return x.squeeze(-1)


def binary(x: torch.Tensor, group: int) -> Quantized:
    """x (..., n, d) quantized to 1 bit per channel and `group` tokens: code 1 where a value is at or above its
    group's mean; the two levels are the means of the group's values below and at-or-above it (float16 zero = the
    lower, scale = their gap), the mean-squared-error-optimal levels for that split. Sums are `pairwise_sum`s. Stored
    as any 1-bit `Quantized`, so `quant.dequantize` and the fused attention read it unchanged."""
    quant.group_dim(x.shape, group, "channel")
    *lead, n, d = x.shape
    grouped = x.float().reshape(*lead, n // group, group, d)
    above = grouped >= (pairwise_sum(grouped, -2) / group).unsqueeze(-2)
    count = above.sum(-2)
    high = pairwise_sum(torch.where(above, grouped, 0.0), -2) / count.clamp_min(1)
    low = pairwise_sum(torch.where(above, 0.0, grouped), -2) / (group - count).clamp_min(1)
    low = torch.where(count == group, high, low)  # a constant group: both levels its value
    zero = low.half()
    scale = (high - zero.float()).half()
    packed = pack(above.reshape(x.shape).to(torch.uint8), 1)
    return Quantized(packed, scale, zero, 1, group, "channel", x.shape)


def rank_channels(keys: torch.Tensor, group: int, wide: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's channels of keys (B, H, n, d) ranked by range over its `group` tokens, widest first (ties to the
    lower channel): (B, H, n / g, d) long, the order a block stores its channels in (the `wide` widest first, then
    the others, each part in channel order), and the wide flags packed a bit each, uint8 (B, H, n / g, ceil(d / 8))."""
    batch, heads, n, dim = keys.shape
    blocks = keys.float().reshape(batch, heads, n // group, group, dim)
    spread = blocks.amax(3) - blocks.amin(3)
    widest = spread.argsort(dim=-1, descending=True, stable=True)[..., :wide]
    anomalous = torch.zeros_like(spread, dtype=torch.bool).scatter_(-1, widest, True)
    return _channel_order(anomalous), pack(anomalous.to(torch.uint8), 1)


def _gathered(x: torch.Tensor, rows: torch.Tensor, channels: torch.Tensor | None, group: int) -> torch.Tensor:
    """x (B, H, n, d) at its stored rows (token rows[b, i] at row i) and, where given, channels (B, H, n / g, k):
    (B, H, n, k), channel j of block k being x's channels[..., k, j] (else all d channels)."""
    batch, heads = x.shape[:2]
    sample = torch.arange(batch, device=x.device).view(batch, 1, 1)
    head = torch.arange(heads, device=x.device).view(1, heads, 1)
    if channels is None:
        return x[sample, head, rows[:, None, :]]
    picked = channels.repeat_interleave(group, dim=2)
    return x[sample[..., None], head[..., None], rows[:, None, :, None], picked]


def wide_keys(keys: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, wide: int, group: int) -> Quantized:
    """The stored keys' wide channels (B, H, n, wide), the first `wide` of each block's `order`, at 2 bits per
    channel over a block."""
    return quant.quantize(_gathered(keys, rows, order[..., :wide], group), 2, group, "channel")


def narrow_coefficients(
    keys: torch.Tensor, rows: torch.Tensor, order: torch.Tensor, wide: int, group: int
) -> torch.Tensor:
    """float32 (B, H, n, d - wide): the `rdft` of each stored key's narrow channels (the rest of `order`), what
    `binary` quantizes; torch on either path."""
    return rdft(_gathered(keys, rows, order[..., wide:], group))


def split_values(
    values: torch.Tensor, rows: torch.Tensor, group: int, salient: int, bits: int
) -> tuple[Quantized, Quantized]:
    """Each block's stored values (rows in `rows` order): its first g - `salient` (plain) ternary per channel over
    the block, (B, H, n / g * (g - s), d), and its last `salient` at `bits` per token, (B, H, n / g * s, d)."""
    batch, heads, n, dim = values.shape
    blocks, kept = n // group, group - salient
    stored = _gathered(values, rows, None, group).view(batch, heads, blocks, group, dim)
    plain, protected = (x.reshape(batch, heads, -1, dim) for x in stored.split([kept, salient], dim=3))
    return quant.quantize(plain, TERNARY, max(kept, 1), "channel"), quant.quantize(protected, bits, dim, "token")


STEPS = (rank_channels, wide_keys, binary, split_values)
"""The encode's quantizing steps in torch; `tokred.kernels.kv_pack_mixed.STEPS` are the same in Triton."""


def key_salience(keys: torch.Tensor) -> torch.Tensor:
    """(B, n) each token's salience from a layer's keys (B, H, n, D) alone: the attention the last token's key
    pays it (softmax over the tokens per head, averaged over the heads), a cheap stand-in for the text's attention
    over the vision tokens."""
    keys = keys.float()
    logits = (keys @ keys[..., -1:, :].transpose(-1, -2)).squeeze(-1) * keys.shape[-1] ** -0.5
    return logits.softmax(-1).mean(1)


@dataclass(frozen=True)
class MixedLayout:
    """VidKV's layout (see the module) for heads of `head_dim` channels: blocks of `group` tokens, `anomalous`
    key channels a head at 2 bits, `salient` tokens a block whose values take `salient_bits`."""

    head_dim: int
    group: int
    anomalous: int
    salient: int
    salient_bits: int

    @property
    def block(self) -> int:
        return self.group

    @property
    def scored(self) -> bool:
        return self.salient > 0

    def score(self, keys: torch.Tensor) -> torch.Tensor:
        return key_salience(keys)

    def encode(
        self, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor | None, backend: str = "auto"
    ) -> MixedStore:
        batch, n = keys.shape[0], keys.shape[2]
        group, wide = self.group, self.anomalous
        salient = torch.zeros(batch, n // group, group, dtype=torch.bool, device=keys.device)
        if self.salient:
            top = scores.float().view(batch, n // group, group).topk(self.salient, dim=-1).indices
            salient.scatter_(-1, top, True)
        rows = _token_rows(salient)
        steps = kv_pack_mixed.STEPS if resolve(backend, keys, values) == "triton" else STEPS
        rank, wide_part, one_bit, split = steps
        order, anomalous = rank(keys, group, wide)
        return MixedStore(
            self,
            wide_part(keys, rows, order, wide, group),
            one_bit(narrow_coefficients(keys, rows, order, wide, group), group),
            *split(values, rows, group, self.salient, self.salient_bits),
            anomalous,
            pack(salient.to(torch.uint8), 1),
        )


@dataclass(frozen=True, eq=False)
class MixedStore:
    """One layer's tokens in VidKV's layout (see the module); n tokens in blocks of g = `layout.group`, s salient
    and g - s plain tokens a block, a wide (2-bit) and d - a narrow (1-bit) key channels a head."""

    layout: MixedLayout
    high: Quantized  # (B, H, n, a) keys' wide channels, 2 bits per channel over a block
    low: Quantized  # (B, H, n, d - a) rdft coefficients of the narrow channels, 1 bit per channel over a block
    values: Quantized  # (B, H, n / g * (g - s), d) plain tokens' values, ternary per channel over a block's
    salient_values: Quantized  # (B, H, n / g * s, d) salient tokens' values, per token
    anomalous_mask: torch.Tensor  # uint8 (B, H, n / g, ceil(d / 8)): a bit per channel, set where it is wide
    salient_mask: torch.Tensor  # uint8 (B, n / g, ceil(g / 8)): a bit per token of a block, set where salient

    @property
    def tokens(self) -> int:
        return self.high.shape[-2]

    @property
    def nbytes(self) -> int:
        masks = (self.anomalous_mask, self.salient_mask)
        return sum(q.nbytes for q in self.parts()) + sum(t.numel() * t.element_size() for t in masks)

    def cat(self, later: MixedStore) -> MixedStore:
        return MixedStore(
            self.layout,
            *(cat_quantized(a, b) for a, b in zip(self.parts(), later.parts(), strict=True)),
            torch.cat([self.anomalous_mask, later.anomalous_mask], dim=-2),
            torch.cat([self.salient_mask, later.salient_mask], dim=-2),
        )

    def first(self, n: int) -> MixedStore:
        blocks = n // self.layout.group
        kept = blocks * (self.layout.group - self.layout.salient)
        counts = (n, n, kept, blocks * self.layout.salient)
        return MixedStore(
            self.layout,
            *(first_quantized(q, count) for q, count in zip(self.parts(), counts, strict=True)),
            self.anomalous_mask[..., :blocks, :],
            self.salient_mask[..., :blocks, :],
        )

    def batch_map(self, fn: Batchwise) -> MixedStore:
        return MixedStore(
            self.layout, *(map_quantized(q, fn) for q in self.parts()), fn(self.anomalous_mask), fn(self.salient_mask)
        )

    @property
    def shape(self) -> torch.Size:
        """(B, H, n, d): the keys' and values' shape it stands for."""
        return torch.Size((*self.high.shape[:3], self.layout.head_dim))

    def parts(self) -> tuple[Quantized, Quantized, Quantized, Quantized]:
        """Its four quantized tensors: wide keys, narrow keys' coefficients, plain values, salient values."""
        return self.high, self.low, self.values, self.salient_values

    def token_rows(self) -> torch.Tensor:
        """(B, n) long: the block position (in token order) each stored row came from, as a token index."""
        group = self.layout.group
        return _token_rows(unpack(self.salient_mask, 1, group).bool())

    def channel_order(self) -> torch.Tensor:
        """(B, H, n / g, d) long: the channel each stored key column of a block came from."""
        return _channel_order(unpack(self.anomalous_mask, 1, self.layout.head_dim).bool())

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, n, dim = self.shape
        blocks, group = n // self.layout.group, self.layout.group
        stored = torch.cat([quant.dequantize(self.high), irdft(quant.dequantize(self.low))], dim=-1)
        channels = self.channel_order()[:, :, :, None, :].expand(batch, heads, blocks, group, dim)
        keys = torch.empty_like(stored).view(channels.shape).scatter_(-1, channels, stored.view(channels.shape))
        counts = (group - self.layout.salient, self.layout.salient)
        parts = (self.values, self.salient_values)
        values = torch.cat(
            [quant.dequantize(q).view(batch, heads, blocks, k, dim) for q, k in zip(parts, counts, strict=True)], 3
        )
        rows = self.token_rows().view(batch, 1, n, 1).expand(batch, heads, n, dim)
        ordered = [torch.empty_like(stored).scatter_(2, rows, x.reshape(batch, heads, n, dim)) for x in (keys, values)]
        return ordered[0], ordered[1]


def _token_rows(salient: torch.Tensor) -> torch.Tensor:
    """(B, n) long from (B, n / g, g) salient flags: each block's plain tokens then its salient ones, each in
    position order, as token indices."""
    batch, blocks, group = salient.shape
    order = salient.to(torch.uint8).argsort(dim=-1, stable=True)
    start = torch.arange(blocks, device=salient.device)[:, None] * group
    return (order + start).view(batch, blocks * group)


def _channel_order(anomalous: torch.Tensor) -> torch.Tensor:
    """(..., d) long from (..., d) flags: the flagged channels then the others, each in channel order."""
    return anomalous.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)
