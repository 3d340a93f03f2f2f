"""VidKV: keys mixed 2-bit / FFT'd 1-bit by channel range, values ternary per channel, salient tokens higher."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from tokred.kv.cache import QuantizedKVCache, head_dim
from tokred.kv.mixed import SALIENT_BITS, MixedLayout
from tokred.methods.base import KVScheme, register


@register("vidkv", stage="kv")
@dataclass(frozen=True)
class VidKV(KVScheme):
    """VidKV (Tao et al., 2025), stored as `tokred.kv.mixed` lays it out. In blocks of `group` tokens: keys per
    channel, the `anomalous` share of a head's channels with the widest range over the block at 2 bits and the rest
    at 1 bit after an FFT across those channels; values ternary per channel, except the `salient` share of each
    block's tokens, whose values take `salient_bits` per token. Salience is what the llm stage measured (the last
    text query's attention at its layer K, where the layer holds that sequence), else the attention the prompt's
    last key pays each key at the layer. The newest `residual` tokens stay exact (`residual` to `residual + group
    - 1` of them, as blocks move whole); ``residual=None`` keeps every token exact (the idle setting).

    At head dim 128 and the defaults a stored value takes 1.85 bits all in (codes, float16 scales and zeros, both
    masks); with the bf16 window that is 2.0 bits or less from about 12k cached tokens on (a long video), e.g. 1.96
    at 16k. Departs from the official code (KD-TAO/VidKV, a patched transformers cache that dequantizes the whole
    cache every step and re-quantizes all of it when its residual fills): blocks of 128 tokens, not 32, so that
    scales and zeros leave room under 2 bits; the FFT is the orthonormal real DFT (n real coefficients for n
    channels; the official code stores the complex FFT, 2n numbers, at 1 bit with levels {0, mean |x|}), and 1-bit
    codes take the two levels that minimise the error for a split at the group's mean; channels are ranked per
    sample, KV head and block (official: once over the whole batch and all heads); ternary values are min/mid/max
    per channel, 5 codes a byte (official: 2-bit codes of a {-1, 0, 1} sign, its scale unused); salient tokens are
    a tenth of each block (a whole count a block, so every block and sample stores the same shape) whose values
    take `salient_bits` per token (official: about a fifth of the video's tokens by vision-text embedding
    similarity, LLaVA-OneVision only, at 2 bits per channel over them)."""

    anomalous: float = 0.5
    salient: float = 0.1
    salient_bits: int = 2
    group: int = 128
    residual: int | None = 32

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("anomalous", "salient"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"{name}.{field} must be a share in [0, 1], got {value!r}")
        if isinstance(self.salient_bits, bool) or self.salient_bits not in SALIENT_BITS:
            allowed = ", ".join(map(str, SALIENT_BITS))
            raise ValueError(f"{name}.salient_bits must be one of {allowed}, got {self.salient_bits!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"{name}.group must be an integer >= 1 (tokens a block), got {self.group!r}")
        residual = self.residual
        if residual is not None and (isinstance(residual, bool) or not isinstance(residual, int) or residual < 0):
            raise ValueError(
                f"{name}.residual must be an integer >= 0 (tokens kept exact) or None (all), got {residual!r}"
            )

    @classmethod
    def example(cls) -> VidKV:
        return cls(salient=0.25, group=8, residual=8)  # the tiny zoo models: 16 or 32 channels, tens of tokens

    @property
    def idle(self) -> bool:
        return self.residual is None

    def as_idle(self) -> VidKV:
        return dataclasses.replace(self, residual=None)

    def layout(self, dim: int) -> MixedLayout:
        """The store's layout for heads of `dim` channels (shares rounded to whole channels and tokens)."""
        wide, salient = _share(self.anomalous, dim), _share(self.salient, self.group)
        return MixedLayout(dim, self.group, wide, salient, self.salient_bits)

    def make_cache(self, config: Any) -> QuantizedKVCache:
        if self.residual is None:
            return QuantizedKVCache(config, None, 0)
        return QuantizedKVCache(config, self.layout(head_dim(config)), self.residual)


def _share(share: float, n: int) -> int:
    """A share of n, rounded half up."""
    return math.floor(share * n + 0.5)
