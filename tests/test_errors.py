"""Bad input gets a clear error that names what was wrong and what is allowed."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import tokred
from tokred import Config, FastV, Random
from tokred.methods import METHODS


def test_unsupported_model_lists_supported_classes():
    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    )
    with pytest.raises(TypeError, match=r"LlamaForCausalLM.*Qwen2_5_VLForConditionalGeneration.*Qwen3VL"):
        tokred.patch(model)


@pytest.mark.parametrize("keep", [0, 0.0, 1.5, -0.25, float("nan")])
def test_keep_out_of_range(keep):
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        Random(keep=keep)
    with pytest.raises(ValueError, match=r"keep must be in \(0, 1\]"):
        FastV(keep=keep)


@pytest.mark.parametrize("keep", ["0.5", None, True])
def test_keep_of_the_wrong_type(keep):
    with pytest.raises(TypeError, match="keep must be a number"):
        Random(keep=keep)


@pytest.mark.parametrize("count", [0, -3, 2.5, True])
def test_keep_tokens_must_be_a_positive_integer(count):
    with pytest.raises(ValueError, match="keep_tokens must be an integer >= 1"):
        Random(keep_tokens=count)


def test_fastv_layer_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="layer must be an integer >= 0"):
        FastV(layer=-1)


def test_fastv_layer_out_of_range_for_the_model(tiny):
    layers = len(tiny.model.model.language_model.layers)
    with pytest.raises(ValueError, match=rf"layer={layers - 1} is out of range .* allowed: 0 to {layers - 2}"):
        tokred.patch(tiny.model, FastV(layer=layers - 1))
    assert not hasattr(tiny.model, "_tokred_session")  # a refused patch leaves the model as it was


def test_pdrop_layers_out_of_range_for_the_model(tiny):
    layers = len(tiny.model.model.language_model.layers)
    with pytest.raises(ValueError, match=rf"PyramidDrop.layers=\(0, {layers}\) is out of range .* allowed: 0 to"):
        tokred.patch(tiny.model, tokred.PyramidDrop(layers=(0, layers)))


@pytest.mark.parametrize("tiny", ["llava"], indirect=True)
def test_tome_in_a_tower_it_cannot_bias_or_read_is_refused(tiny, monkeypatch):
    from tokred.adapters import adapter_for

    config = adapter_for(tiny.model).vision_attention(0).config
    monkeypatch.setattr(config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(
        ValueError, match="proportional attention, which needs an additive attention bias.*sdpa or eager"
    ):
        tokred.patch(tiny.model, tokred.ToMe(keep=0.25))
    monkeypatch.undo()
    monkeypatch.setattr(tiny.model.config, "vision_feature_layer", [-2, -1])
    with pytest.raises(ValueError, match=r"several tower layers \[-2, -1\]; tokred merges in towers that feed"):
        tokred.patch(tiny.model, tokred.ToMe(keep=0.25))
    assert not hasattr(tiny.model, "_tokred_session")


def test_a_refused_patch_keeps_the_previous_one(tiny):
    with tokred.patched(tiny.model, "random-50"):
        with pytest.raises(ValueError, match="out of range"):
            tokred.patch(tiny.model, FastV(layer=99))
        tiny.model(**tiny.image())
        counts = tokred.stats(tiny.model).vision_tokens
        assert counts["pre_llm"] == [Random(keep=0.5).budget(counts["input"][0])]


def test_unknown_preset_lists_presets_and_methods(tiny):
    listing = rf"unknown preset or method 'fastv-33'.*random-50.*fastv-25.*methods are: {', '.join(sorted(METHODS))} "
    with pytest.raises(ValueError, match=listing):
        tokred.patch(tiny.model, "fastv-33")


def test_a_method_name_means_its_defaults(tiny):
    with tokred.patched(tiny.model, "random"):
        tiny.model(**tiny.image())
        counts = tokred.stats(tiny.model).vision_tokens
    assert counts["pre_llm"] == [Random().budget(counts["input"][0])]


@pytest.mark.parametrize("config", [42, {"prune": "fastv"}, ["fastv-25"]])
def test_config_of_the_wrong_type(tiny, config):
    with pytest.raises(TypeError, match="patch\\(\\) takes None, a preset name, a method config or a tokred.Config"):
        tokred.patch(tiny.model, config)


def test_config_rejects_non_methods_and_two_methods_per_stage():
    with pytest.raises(TypeError, match="Config.prune items must be method configs"):
        Config(prune=["fastv"])
    with pytest.raises(ValueError, match="two methods for stage 'pre_llm'"):
        Config(prune=[Random(keep=0.5), Random(keep=0.25)])


def test_stats_needs_a_patched_model(tiny):
    with pytest.raises(ValueError, match="patched with tokred.patch"):
        tokred.stats(tiny.model)


def test_pixels_without_input_ids(tiny):
    inputs = tiny.image()
    embeds = tiny.model.get_input_embeddings()(inputs.pop("input_ids"))
    with tokred.patched(tiny.model, "random-50"), pytest.raises(ValueError, match="needs `input_ids`"):
        tiny.model(**inputs, inputs_embeds=embeds)


def test_a_method_of_a_stage_without_a_runtime_is_refused(tiny, monkeypatch):
    from tokred.stages.base import RUNTIMES

    monkeypatch.delitem(RUNTIMES, "weights")  # as for a stage whose runtime is not written yet
    with pytest.raises(ValueError, match="'uniform_bits' runs in stage 'weights', which has no runtime yet"):
        tokred.patch(tiny.model, Config(weights=tokred.UniformBits(bits=4, group=32)))
    assert not hasattr(tiny.model, "_tokred_session")
