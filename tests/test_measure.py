"""tokred.measure: the step clock and the KV bytes that `tokred eval` and the demo report."""

from __future__ import annotations

from transformers import DynamicCache, LogitsProcessorList

from tokred import compat
from tokred.measure import StepClock, kv_bytes


def test_kv_bytes_counts_every_layers_keys_and_values(tiny):
    inputs = tiny.image()
    cache = compat.output_cache(tiny.model(**inputs, use_cache=True))
    config = tiny.model.config.get_text_config()
    heads = config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = 2 * config.num_hidden_layers * inputs["input_ids"].shape[1] * heads * dim * 4  # fp32
    assert kv_bytes(cache) == expected
    assert kv_bytes(DynamicCache()) == 0


def test_a_cache_that_reports_its_size_is_believed():
    class Packed:
        layers = ()

        def nbytes(self) -> int:
            return 1234

    assert kv_bytes(Packed()) == 1234


def test_the_step_clock_ticks_once_per_new_token(tiny):
    clock = StepClock()
    tiny.model.generate(
        **tiny.image(),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
    )
    assert len(clock.ticks) == 5 and clock.ticks == sorted(clock.ticks)


def test_kv_bytes_counts_every_tensor_a_cache_layer_holds():
    """A cache without its own count: every tensor its layers hold, a quantized store's inner tensors included."""
    from types import SimpleNamespace

    import torch

    keys, values = torch.zeros(2, 3, 4, dtype=torch.bfloat16), torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    store = (torch.zeros(5, dtype=torch.uint8), {"scale": torch.zeros(2, dtype=torch.float16)})
    layer = SimpleNamespace(keys=keys, values=values, _quantized_keys=store, is_initialized=True)
    assert kv_bytes(SimpleNamespace(layers=[layer, layer])) == 2 * (2 * 24 * 2 + 5 + 4)
