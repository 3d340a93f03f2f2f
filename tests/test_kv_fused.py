"""The fused decode attention wired into the model (tokred's kv stage): a decode step over a quantized cache reads
its packed store through `tokred.kernels.kv_attention` (Triton, in its CPU interpreter here), with the same tokens
and attention outputs as the torch path (the same cache in an unpatched model, which dequantizes the store), on
every family, padded batches, beam search, the llm stage's shorter caches and eager masks; no dequantized copy of
the store is made; prefills and multi-token steps keep the torch path."""

from __future__ import annotations

import copy

import pytest
import torch

import tokred
from tokred import KIVI, Config, FastV, Int8, compat
from tokred.adapters import adapter_for
from tokred.kernels import dispatch, kv_attention
from tokred.kv import QuantizedKVCache, cache_for, quant
from tokred.methods import VidKV

pytestmark = pytest.mark.skipif(
    dispatch.triton is None or not dispatch.interpreting() and not torch.cuda.is_available(),
    reason="the fused path runs Triton: a CUDA GPU, or TRITON_INTERPRET=1 for its CPU interpreter",
)

SCHEMES = {"int8": Int8(), "kivi-2": KIVI(group=8, residual=8), "vidkv": VidKV(salient=0.25, group=16, residual=8)}
"""Each store layout the kernels read, at settings that store most of a tiny model's prompt (VidKV in blocks of one
tile: the interpreter is slow)."""
STEPS = 4


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The query shape of each call of the Triton decode attention (over a grouped or a VidKV store)."""
    calls: list[tuple[int, ...]] = []
    for name in ("decode_attention_triton", "mixed_attention_triton"):
        kernel = getattr(kv_attention, name)

        def counted(query, *args, kernel=kernel, **kwargs):
            calls.append(tuple(query.shape))
            return kernel(query, *args, **kwargs)

        monkeypatch.setattr(kv_attention, name, counted)
    return calls


def decode(model, inputs: dict, scheme, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor], QuantizedKVCache]:
    """Greedy generate of STEPS tokens into a fresh cache of `scheme`: the ids, every LLM layer's attention output
    at each decode step (layer-major within a step) and the cache."""
    outputs: list[torch.Tensor] = []
    hooks = []
    for index in range(len(adapter_for(model).layers)):
        attention = adapter_for(model).attention(index)
        hook = lambda m, args, kw, out: outputs.append(out[0]) if out[0].shape[1] == 1 else None  # noqa: E731
        hooks.append(attention.register_forward_hook(hook, with_kwargs=True))
    cache = cache_for(model, scheme)
    try:
        ids = model.generate(
            **inputs,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            **kwargs,
            **{compat.cache_argument(model): cache},
        )
    finally:
        for hook in hooks:
            hook.remove()
    return ids, outputs, cache


@pytest.mark.parametrize("name", list(SCHEMES))
def test_fused_decode_gives_the_torch_paths_tokens_and_attention(tiny, kernel_calls, name):
    """A padded batch with GQA (4 query heads on 2 KV heads): the cache passed to the unpatched model runs the
    torch path, to the patched one the kernel, once per layer and decode step (never on the prefill)."""
    inputs, scheme = tiny.batch(), SCHEMES[name]
    want, want_out, _ = decode(tiny.model, inputs, scheme)
    assert kernel_calls == []
    with tokred.patched(tiny.model, scheme):
        got, got_out, cache = decode(tiny.model, inputs, scheme)
    layers = len(cache.layers)
    assert kernel_calls == [(2, 4, 1, 16)] * layers * (STEPS - 1)
    assert all(layer.stored_length() > 0 for layer in cache.layers)
    assert torch.equal(got, want)
    assert len(got_out) == len(want_out) == layers * (STEPS - 1)
    for fused, reference in zip(got_out, want_out, strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["kivi-2", "vidkv"])
def test_no_dequantized_copy_is_made_on_the_fused_path(tiny, monkeypatch, kernel_calls, name):
    """With every dequantizing function refusing, the patched model still generates over a store; the unpatched
    model, whose torch path dequantizes, cannot."""

    def refused(*args, **kwargs):
        raise AssertionError("the store was dequantized")

    monkeypatch.setattr(quant, "dequantize", refused)
    monkeypatch.setattr(kv_attention, "dequantize", refused)
    scheme = SCHEMES[name]
    with tokred.patched(tiny.model, scheme):
        ids, _, cache = decode(tiny.model, tiny.batch(), scheme)
    assert all(layer.stored_length() > 0 for layer in cache.layers) and len(kernel_calls) == 4 * (STEPS - 1)
    with pytest.raises(AssertionError, match="the store was dequantized"):
        decode(tiny.model, tiny.batch(), scheme)


def test_beam_search_reads_the_reordered_store(tiny, kernel_calls):
    scheme, inputs = SCHEMES["kivi-2"], tiny.image()
    kwargs = {"num_beams": 3, "num_return_sequences": 2}
    want, _, _ = decode(tiny.model, inputs, scheme, **kwargs)
    with tokred.patched(tiny.model, scheme):
        got, _, cache = decode(tiny.model, inputs, scheme, **kwargs)
    assert kernel_calls and {shape[0] for shape in kernel_calls} == {3}
    assert torch.equal(got, want) and cache.layers[0].stored_length() > 0 and cache.layers[0].keys.shape[0] == 3


def test_the_llm_stages_shorter_caches_and_their_masks(tiny, kernel_calls):
    """FastV cuts after layer 1: layers 2 and 3 hold fewer tokens, with the llm stage's mask over them; the torch
    path is FastV alone with the cache passed in."""
    fastv, scheme, inputs = FastV(layer=1, keep=0.25), SCHEMES["kivi-2"], tiny.batch()
    with tokred.patched(tiny.model, fastv):
        want, want_out, _ = decode(tiny.model, inputs, scheme)
    assert kernel_calls == []
    with tokred.patched(tiny.model, Config(prune=fastv, kv=scheme)):
        got, got_out, cache = decode(tiny.model, inputs, scheme)
    lengths = [layer.get_seq_length() for layer in cache.layers]
    assert lengths[1] > lengths[2] and len(kernel_calls) == 4 * (STEPS - 1)
    assert torch.equal(got, want)
    for fused, reference in zip(got_out, want_out, strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_eager_masks(tiny, kernel_calls):
    model = tiny.load(attn_implementation="eager")
    scheme, inputs = SCHEMES["int8"], tiny.batch()
    want, want_out, _ = decode(model, inputs, scheme)
    with tokred.patched(model, scheme):
        got, got_out, _ = decode(model, inputs, scheme)
    assert len(kernel_calls) == 4 * (STEPS - 1) and torch.equal(got, want)
    for fused, reference in zip(got_out, want_out, strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_a_multi_token_step_over_a_store_keeps_the_torch_path(tiny, kernel_calls):
    """Two tokens at once over a cache that holds a store (as speculative decoding verifies) run the model's own
    attention over the dequantized store, exactly as unpatched; one token runs the kernel."""
    scheme = SCHEMES["kivi-2"]
    _, _, cache = decode(tiny.model, tiny.image(), scheme)
    assert cache.layers[0].stored_length() > 0
    language_model = adapter_for(tiny.model).language_model
    name = compat.cache_argument(language_model)
    hidden = tiny.model.config.get_text_config().hidden_size
    embeds = torch.randn(1, 3, hidden, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(cache)
    want = [language_model(inputs_embeds=embeds[:, :2], **{name: twin}).last_hidden_state]
    want.append(language_model(inputs_embeds=embeds[:, 2:], **{name: twin}).last_hidden_state)
    with tokred.patched(tiny.model, scheme):
        got = [language_model(inputs_embeds=embeds[:, :2], **{name: cache}).last_hidden_state]
        assert kernel_calls == []
        got.append(language_model(inputs_embeds=embeds[:, 2:], **{name: cache}).last_hidden_state)
    assert len(kernel_calls) == len(cache.layers)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_stats_report_the_cache_bytes_against_a_bf16_cache(tiny):
    """After generate, stats hold the quantized cache's bytes and a bf16 DynamicCache's of the same tokens."""
    inputs = tiny.batch()
    with tokred.patched(tiny.model, tokred.KIVI(bits=2, group=8, residual=8)):
        out = tiny.model.generate(
            **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True
        )
        counted = tokred.stats(tiny.model).kv_bytes
    cache = compat.output_cache(out)
    config = tiny.model.config.get_text_config(decoder=True)
    heads = config.num_key_value_heads
    tokens = sum(layer.get_seq_length() for layer in cache.layers)
    assert counted == {"cache": cache.nbytes(), "bf16": 2 * 2 * 2 * heads * cache.layers[0].keys.shape[-1] * tokens}
    assert 8 * counted["cache"] / (counted["bf16"] // 2) == cache.bits_per_value() < 16
