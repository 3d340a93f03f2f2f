"""VidKV: the mixed store against its definition (the real DFT, channel ranking, salient tokens, the error bound of
each part), its bits per value all in, the salience it is given, generate on every family, and bad settings."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import tokred
from tokred import Config, FastV, compat
from tokred.kv import MixedLayout, QuantizedKVCache, cache_for, dequantize
from tokred.kv.cache import QuantizedKVLayer, head_dim
from tokred.kv.mixed import binary, irdft, key_salience, rdft
from tokred.methods import VidKV

STEPS = 2  # one decode step: it stores the prompt


def dft_basis(n: int) -> torch.Tensor:
    """(n, n) the orthonormal real DFT written out: the constant row, a cosine and a sine row per frequency below
    n / 2, and the alternating row for even n (the rows `rdft` gives its coefficients in)."""
    j = torch.arange(n, dtype=torch.float64)
    rows = [torch.full((n,), n**-0.5, dtype=torch.float64)]
    for k in range(1, (n + 1) // 2):
        angle = 2 * math.pi * k * j / n
        rows += [math.sqrt(2 / n) * torch.cos(angle), -math.sqrt(2 / n) * torch.sin(angle)]
    if n % 2 == 0:
        rows.append((-1.0) ** j / math.sqrt(n))
    return torch.stack(rows).float()


@pytest.mark.parametrize("n", [1, 2, 5, 8, 13, 16])
def test_rdft_is_the_orthonormal_real_dft_and_irdft_inverts_it(n):
    x = torch.randn(3, 4, n, generator=torch.Generator().manual_seed(n))
    basis = dft_basis(n)
    torch.testing.assert_close(basis @ basis.T, torch.eye(n), atol=1e-5, rtol=0)
    torch.testing.assert_close(rdft(x), x @ basis.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(irdft(rdft(x)), x, atol=1e-5, rtol=1e-5)


def test_binary_codes_split_at_the_mean_onto_each_sides_mean():
    x = torch.randn(2, 3, 24, 5, generator=torch.Generator().manual_seed(0))
    x[..., 8:16, 4] = 1.5  # a constant group
    q = binary(x, 8)
    got = dequantize(q)
    groups = x.view(2, 3, 3, 8, 5)
    above = groups >= groups.mean(3, keepdim=True)
    high = (groups * above).sum(3, keepdim=True) / above.sum(3, keepdim=True)
    low = (groups * ~above).sum(3, keepdim=True) / (~above).sum(3, keepdim=True).clamp_min(1)
    low = torch.where(above.all(3, keepdim=True), high, low)
    want = torch.where(above, high, low).view_as(x)
    assert q.bits == 1 and q.packed.shape[-1] == 1  # 5 channels: one byte a token
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # float16 levels
    assert torch.equal(got[..., 8:16, 4], torch.full_like(got[..., 8:16, 4], 1.5))


def block_inputs(seed: int = 0, batch: int = 2, heads: int = 2, n: int = 32, dim: int = 16):
    """Keys with a few outlier channels, values, and salience scores."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, n, dim, generator=g)
    keys[..., [2, 9]] *= 6
    keys[..., 5] += 4
    return keys, torch.randn(batch, heads, n, dim, generator=g), torch.rand(batch, n, generator=g)


LAYOUT = MixedLayout(head_dim=16, group=16, anomalous=6, salient=3, salient_bits=2)


def test_the_store_keeps_each_blocks_widest_channels_and_most_salient_tokens():
    keys, values, scores = block_inputs()
    store = LAYOUT.encode(keys, values, scores)
    blocks = keys.view(2, 2, 2, 16, 16)
    widest = (blocks.amax(3) - blocks.amin(3)).topk(6, dim=-1).indices.sort(-1).values
    assert torch.equal(store.channel_order()[..., :6], widest), "the wide channels first, in channel order"
    salient = scores.view(2, 2, 16).topk(3, dim=-1).indices.sort(-1).values + torch.tensor([[0], [16]])
    assert torch.equal(store.token_rows().view(2, 2, 16)[..., 13:], salient), "the salient tokens last"
    plain = store.token_rows().view(2, 2, 16)[..., :13]
    every = torch.cat([plain, salient], dim=-1).sort(-1).values
    assert bool((plain.diff(dim=-1) > 0).all()) and torch.equal(every, torch.arange(32).view(2, 16).expand(2, 2, 16))


def test_round_trip_is_within_each_parts_analytic_bound():
    """Wide key channels and values: within half a step of their min/max grids (2 bits over the block's tokens,
    ternary over its plain tokens, 2 bits over a salient token's channels). Narrow key channels: the transform is
    orthonormal, so a token's error over them is the L2 norm of its coefficients' errors, each at most the wider
    side of its group around the mean."""
    keys, values, scores = block_inputs(seed=1)
    store = LAYOUT.encode(keys, values, scores)
    got_keys, got_values = store.dequantize()
    slack = 1.002  # float16 scales and zeros
    error = (got_keys - keys).abs().view(2, 2, 2, 16, 16)
    blocks = keys.view(2, 2, 2, 16, 16)
    order = store.channel_order()
    wide = order[..., :6, None].transpose(-1, -2).expand(-1, -1, -1, 16, -1)
    step = (blocks.amax(3) - blocks.amin(3)) / 3
    assert bool((error.gather(-1, wide) <= slack * step.gather(-1, order[..., :6])[..., None, :] / 2 + 1e-6).all())
    narrow = order[..., 6:, None].transpose(-1, -2).expand(-1, -1, -1, 16, -1)
    coefficients = rdft(blocks.gather(-1, narrow))
    mean = coefficients.mean(3, keepdim=True)
    side = torch.maximum(coefficients.amax(3, keepdim=True) - mean, mean - coefficients.amin(3, keepdim=True))
    bound = side.square().sum(-1).sqrt()
    assert bool((error.gather(-1, narrow).norm(dim=-1) <= slack * bound + 1e-5).all())
    rows = (store.token_rows() % 16).view(2, 1, 2, 16, 1).expand(-1, 2, -1, -1, 16)
    stored = values.view(2, 2, 2, 16, 16).gather(3, rows)  # plain tokens then salient ones, per block
    error = (got_values.view(2, 2, 2, 16, 16).gather(3, rows) - stored).abs()
    plain, salient = stored[..., :13, :], stored[..., 13:, :]
    plain_step = (plain.amax(3, keepdim=True) - plain.amin(3, keepdim=True)) / 2
    salient_step = (salient.amax(-1, keepdim=True) - salient.amin(-1, keepdim=True)) / 3
    assert bool((error[..., :13, :] <= slack * plain_step / 2 + 1e-6).all())
    assert bool((error[..., 13:, :] <= slack * salient_step / 2 + 1e-6).all())


def test_cat_first_and_batch_map_act_as_on_the_tokens():
    keys, values, scores = block_inputs(seed=2)
    whole = LAYOUT.encode(keys, values, scores)
    parts = LAYOUT.encode(keys[..., :16, :], values[..., :16, :], scores[:, :16])
    parts = parts.cat(LAYOUT.encode(keys[..., 16:, :], values[..., 16:, :], scores[:, 16:]))
    for a, b in zip(whole.dequantize(), parts.dequantize(), strict=True):
        assert torch.equal(a, b), "blocks are encoded alone"
    head = whole.first(16)
    assert head.tokens == 16 and head.nbytes * 2 == whole.nbytes
    assert all(torch.equal(a, b[..., :16, :]) for a, b in zip(head.dequantize(), whole.dequantize(), strict=True))
    order = torch.tensor([1, 1, 0])
    mapped = whole.batch_map(lambda t: t.index_select(0, order))
    again = LAYOUT.encode(keys[order], values[order], scores[order])
    assert all(torch.equal(a, b) for a, b in zip(mapped.dequantize(), again.dequantize(), strict=True))


def config(dim: int, kv_heads: int = 2, layers: int = 1) -> SimpleNamespace:
    """A text config of full-attention layers with `kv_heads` heads of `dim` channels."""
    return SimpleNamespace(
        head_dim=dim, num_key_value_heads=kv_heads, num_attention_heads=4 * kv_heads, num_hidden_layers=layers
    )


def expected_bits(layer: QuantizedKVLayer, window_bits: int) -> float:
    """Bits per value of one VidKV layer, counted from its layout: per block and KV head, the wide channels' 2-bit
    and the narrow ones' 1-bit codes, a float16 scale and zero per channel, the channel bits; the plain tokens'
    ternary codes (5 a byte) and a scale and zero per channel; each salient token's codes and its scale and zero;
    per block and sample its token bits; the window exact, and a float32 score per window token and sample."""
    lay: MixedLayout = layer.layout
    batch, heads, window, d = layer.keys.shape
    g, a, s = lay.group, lay.anomalous, lay.salient
    blocks = layer.stored_length() // g
    keys = g * (math.ceil(a / 4) + math.ceil((d - a) / 8)) + 2 * 2 * d + math.ceil(d / 8)
    values = (g - s) * math.ceil(d / 5) + 2 * 2 * d + s * (math.ceil(d * lay.salient_bits / 8) + 2 * 2)
    stored = batch * blocks * (heads * (keys + values) + math.ceil(g / 8))
    exact = batch * window * (2 * heads * d * window_bits // 8 + 4)
    return 8 * (stored + exact) / (2 * batch * heads * d * (layer.stored_length() + window))


def test_bits_per_value_at_head_dim_128_on_a_long_prompt_are_two_or_fewer():
    """A long video prompt (16,384 tokens, 128 frames of 128 tokens) at Qwen2.5-VL-7B's head dim 128, bf16, VidKV's
    defaults: the bytes the cache reports are those its layout says, and under 2 bits a value all in."""
    cache = VidKV().make_cache(config(128))
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(1, 2, 16384, 128, generator=g).bfloat16() for _ in range(2))
    cache.update(keys, values, 0)
    cache.update(keys[..., -1:, :], values[..., -1:, :], 0)
    layer = cache.layers[0]
    assert layer.stored_length() == 16384 - 128 and layer.keys.shape[-2] == 129
    assert cache.bits_per_value() == pytest.approx(expected_bits(layer, 16))
    assert cache.bits_per_value() <= 2.0


def generate(tiny, inputs: dict, **kwargs) -> tuple[torch.Tensor, QuantizedKVCache]:
    out = tiny.model.generate(
        **inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True, **kwargs
    )
    return out.sequences, compat.output_cache(out)


def test_generate_on_every_family_with_the_bits_its_layout_says(tiny):
    inputs = tiny.batch()
    stock, _ = generate(tiny, inputs)
    scheme = VidKV.example()
    with tokred.patched(tiny.model, scheme):
        ids, cache = generate(tiny, inputs)
    assert isinstance(cache, QuantizedKVCache) and ids.shape == stock.shape
    assert all(layer.stored_length() > 0 and isinstance(layer.layout, MixedLayout) for layer in cache.layers)
    assert torch.equal(ids[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    layers = cache.layers
    expected = sum(expected_bits(layer, 32) * layer.values_held() for layer in layers)  # float32 tiny models
    assert cache.bits_per_value() == pytest.approx(expected / sum(layer.values_held() for layer in layers))
    covered = VidKV(salient=0.25, group=8, residual=4096)
    with tokred.patched(tiny.model, covered):
        ids, cache = generate(tiny, inputs)
    assert all(layer.store is None for layer in cache.layers) and torch.equal(ids, stock)


def test_salience_comes_from_the_llm_stage_where_it_covers_a_layer_else_from_its_keys(tiny, monkeypatch):
    """With FastV cutting after layer 1, layers 0 and 1 rank their prompt by the last query's attention at layer 1,
    layers 2 and 3 by the same scores at the positions they kept; without an llm stage each layer scores its own
    keys. Either way a block's salient tokens are its highest-scoring ones."""
    given: dict[int, torch.Tensor] = {}
    take = QuantizedKVLayer.take_scores

    def recorded(layer: QuantizedKVLayer, scores: torch.Tensor) -> None:
        given[id(layer)] = scores
        take(layer, scores)

    monkeypatch.setattr(QuantizedKVLayer, "take_scores", recorded)
    inputs = tiny.batch()
    scheme = VidKV(salient=0.25, group=8, residual=0)
    fastv = FastV(layer=1, keep=0.5)
    with tokred.patched(tiny.model, Config(prune=fastv, kv=scheme)):
        _, cache = generate(tiny, inputs)
        call = tiny.model._tokred_session.call
    last, cut = call.signals["last_query"], call.selections["llm"]
    scores = [given[id(layer)] for layer in cache.layers]
    assert torch.equal(scores[0], last) and torch.equal(scores[1], last)
    kept = last.gather(1, cut.index).masked_fill(~cut.key_valid, 0)
    assert torch.equal(scores[2], kept) and torch.equal(scores[3], kept)
    for layer, score in zip(cache.layers, scores, strict=True):
        assert_salient_last(layer, score)
    given.clear()
    with tokred.patched(tiny.model, scheme):
        _, cache = generate(tiny, inputs)
    assert not given
    prompt = inputs["input_ids"].shape[1]
    stock = tiny.model(**inputs, use_cache=True)
    for own, exact in zip(cache.layers, compat.output_cache(stock).layers, strict=True):
        assert_salient_last(own, key_salience(exact.keys[..., :prompt, :]))


def assert_salient_last(layer: QuantizedKVLayer, scores: torch.Tensor) -> None:
    """The last block of 8 wholly in the prompt (every sample's real tokens, after left padding) stores its 2
    highest-scoring tokens last."""
    block = scores.shape[1] // 8 - 1
    rows = layer.store.token_rows().view(scores.shape[0], -1, 8)[:, block, 6:] - 8 * block
    top = scores[:, 8 * block : 8 * block + 8].topk(2, dim=-1).indices
    assert torch.equal(rows.sort(-1).values, top.sort(-1).values)


def test_recipe_text_and_idle():
    assert Config.parse("vidkv:salient=0.2:group=64") == Config(kv=VidKV(salient=0.2, group=64))
    assert str(Config(kv=VidKV(anomalous=0.25))) == "vidkv:anomalous=0.25"
    idle = VidKV().as_idle()
    assert idle.idle and not VidKV().idle and idle == Config.parse("vidkv:residual=None").kv
    cache = idle.make_cache(config(16))
    assert all(layer.layout is None for layer in cache.layers)
    assert VidKV().layout(128) == MixedLayout(128, 128, 64, 13, 2)
    assert VidKV(anomalous=0.3, salient=0.0).layout(16) == MixedLayout(16, 128, 5, 0, 2)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: VidKV(anomalous=1.5), r"VidKV.anomalous must be a share in \[0, 1\], got 1.5"),
        (lambda: VidKV(salient=-0.1), r"VidKV.salient must be a share in \[0, 1\], got -0.1"),
        (lambda: VidKV(salient=True), r"VidKV.salient must be a share in \[0, 1\], got True"),
        (lambda: VidKV(salient_bits=3), r"VidKV.salient_bits must be one of 2, 4, 8, got 3"),
        (lambda: VidKV(group=0), r"VidKV.group must be an integer >= 1 \(tokens a block\), got 0"),
        (lambda: VidKV(residual=-2), r"VidKV.residual must be an integer >= 0 \(tokens kept exact\) or None"),
        (lambda: Config.parse("vidkv:bits=2"), r"vidkv has no field 'bits'.*anomalous, salient, salient_bits"),
    ],
)
def test_bad_settings_are_refused_with_what_is_allowed(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_cache_for_a_model_takes_its_head_dim(tiny):
    cache = cache_for(tiny.model, VidKV())
    dim = head_dim(tiny.model.config.get_text_config())
    assert cache.layers[0].layout == VidKV().layout(dim) and cache.layers[0].layout.anomalous == dim // 2
