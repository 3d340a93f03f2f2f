"""The weights stage: every LLM linear the bit map names runs packed (QuantLinear), the tower is untouched, the
output is the model's with its dequantized weights, unpatch restores the stock modules bit for bit, and weights
combine with token reduction and a KV scheme in one Config."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tokred
from tokred.weights.calibrate import calibrate, llm_linears
from tokred.weights.linear import QuantLinear
from tokred.weights.quant import dequantize_weight, quantize_weight
from tokred.zoo import load

GROUP = 32


def dequantized_copy(model: nn.Module, bit_map: dict[str, int], group: int = GROUP) -> nn.Module:
    """A deep copy of `model` whose mapped linears hold their weights quantized and dequantized: the reference."""
    ref = copy.deepcopy(model)
    for name, bits in bit_map.items():
        linear = ref.get_submodule(name)
        w = linear.weight.data
        linear.weight.data = dequantize_weight(quantize_weight(w, bits, group)).to(w.dtype)
    return ref


def quantized_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_uniform_bits_quantize_the_llm_only_and_match_the_dequantized_model(tiny):
    inputs = tiny.batch()
    names = set(llm_linears(tiny.model))
    ref = dequantized_copy(tiny.model, dict.fromkeys(names, 3))
    with tokred.patched(tiny.model, tokred.UniformBits(bits=3, group=GROUP)):
        assert quantized_names(tiny.model) == names and names  # every LLM linear, nothing of the tower
        assert not any(n.startswith(("model.visual", "model.vision_tower")) for n in names)
        got = tiny.model(**inputs).logits
    torch.testing.assert_close(got, ref(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, tiny.model(**inputs).logits, atol=1e-3)  # 3 bits do change the output


def test_unpatch_restores_every_weight_bit_for_bit(tiny):
    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    modules = {name: m for name, m in tiny.model.named_modules()}
    tokred.patch(tiny.model, tokred.UniformBits(bits=2, group=GROUP))
    tokred.unpatch(tiny.model)
    assert dict(tiny.model.named_modules()) == modules  # the very same module objects, back in place
    after = tiny.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def llava_calibration(tmp_path_factory):
    model, processor = load("shapes-llava")
    path = tmp_path_factory.mktemp("calibration") / "shapes-llava.json"
    calibrate(model, processor, n=8, group=GROUP, progress=False).to_json(path)
    return model, processor, path


def test_layerbits_meets_its_budget_and_packs_below_uniform(llava_calibration):
    model, processor, path = llava_calibration
    stock_bytes = sum(m.weight.numel() * m.weight.element_size() for m in llm_linears(model).values())
    sizes = {}
    for scheme in (
        tokred.UniformBits(bits=3, group=GROUP),
        tokred.LayerBits(avg_bits=3.0, group=GROUP, calibration=str(path)),
    ):
        with tokred.patched(model, scheme):
            layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
            params = sum(m.in_features * m.out_features for m in layers)
            stock = [m for m in llm_linears(model).values()]  # the layers left at 16 bits
            code_bits = sum(m.bits * m.in_features * m.out_features for m in layers) + 16 * sum(
                m.weight.numel() for m in stock
            )
            assert code_bits / (params + sum(m.weight.numel() for m in stock)) <= 3.0
            sizes[scheme.name] = sum(m.nbytes() for m in layers) + sum(m.weight.numel() * 4 for m in stock)
    assert sizes["uniform_bits"] < stock_bytes / 4


def test_weights_tokens_and_kv_combine_in_one_config(tiny_video):
    tiny = tiny_video
    inputs = tiny.batch()
    names = llm_linears(tiny.model)
    reducers = [tokred.FastV(layer=1, keep=0.5), tokred.KIVI(bits=4, group=8, residual=8)]
    ref = dequantized_copy(tiny.model, dict.fromkeys(names, 4))
    generate = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with tokred.patched(ref, tokred.Config(prune=reducers)):
        expected = ref.generate(**inputs, **generate)
        kept = tokred.stats(ref).vision_tokens
    config = tokred.Config(prune=reducers, weights=tokred.UniformBits(bits=4, group=GROUP))
    with tokred.patched(tiny.model, config):
        got = tiny.model.generate(**inputs, **generate)
        assert tokred.stats(tiny.model).vision_tokens == kept
        assert quantized_names(tiny.model) == set(names)
    assert torch.equal(got, expected)


def test_bad_weight_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="must be one of 2, 3, 4, 8"):
        tokred.UniformBits(bits=5)
    with pytest.raises(ValueError, match="group"):
        tokred.patch(tiny.model, tokred.UniformBits(bits=4, group=48))
    assert not quantized_names(tiny.model)
    with pytest.raises(ValueError, match="avg_bits must be between the smallest candidate width, 2"):
        tokred.LayerBits(avg_bits=1.5)
