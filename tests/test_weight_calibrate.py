"""LUQ calibration (tokred.weights.calibrate) on the trained shapes-llava checkpoint, its JSON form, and the weight
schemes built on it (LayerBits, UniformBits)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tokred
from tokred.methods import METHODS, LayerBits, UniformBits
from tokred.weights.allocate import allocate
from tokred.weights.calibrate import Calibration, calibrate, histogram_entropy, shapes_samples
from tokred.weights.quant import dequantize_weight, quantize_weight
from tokred.zoo import load

CANDIDATES = (2, 3, 4, 8)


@pytest.fixture(scope="module")
def llava():
    return load("shapes-llava")


@pytest.fixture(scope="module")
def samples(llava):
    return shapes_samples(llava[1], 3)


@pytest.fixture(scope="module")
def calibration(llava, samples):
    model, processor = llava
    return calibrate(model, processor, samples, progress=False)


def llm_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        n: m for n, m in model.named_modules() if n.startswith("model.language_model.") and isinstance(m, nn.Linear)
    }


def test_one_entry_per_llm_linear_with_errors_falling_with_the_width(llava, calibration):
    model, _ = llava
    linears = llm_linears(model)
    assert len(linears) == 28 and list(calibration.layers) == list(linears)  # 4 layers of q, k, v, o, gate, up, down
    assert (calibration.model, calibration.group, calibration.candidates, calibration.samples) == (
        model.config._name_or_path,
        64,
        CANDIDATES,
        3,
    )
    for name, stats in calibration.layers.items():
        out, inputs = linears[name].weight.shape
        assert stats.shape == (out, inputs) and stats.params == out * inputs
        errors = [stats.errors[b] for b in CANDIDATES]
        assert all(a > b > 0 for a, b in zip(errors, errors[1:], strict=False)), (name, errors)
        assert math.isfinite(stats.entropy) and 0 < stats.entropy <= math.log2(256)
        # codes packed along a row, then a float16 scale and zero per 64 input channels
        assert stats.nbytes == {b: out * math.ceil(inputs * b / 8) + out * inputs // 64 * 4 for b in CANDIDATES}


def test_errors_and_entropy_agree_with_a_direct_measurement(llava, samples, calibration):
    model, _ = llava
    name = "model.language_model.layers.2.mlp.down_proj"
    module = model.get_submodule(name)
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0][0], out[0])))
    try:
        for sample in samples:
            model(**sample)
    finally:
        handle.remove()
    x = torch.cat([inputs for inputs, _ in seen]).float()
    w = module.weight.float()
    for b in CANDIDATES:
        quantized = dequantize_weight(quantize_weight(w, b, 64))
        expected = torch.linalg.norm(x @ w.T - x @ quantized.T) / torch.linalg.norm(x @ w.T)
        assert calibration.layers[name].errors[b] == pytest.approx(float(expected), rel=1e-4)
    image = model.config.image_token_id
    entropies = [
        float(histogram_entropy(out[s["input_ids"][0] == image])) for s, (_, out) in zip(samples, seen, strict=True)
    ]
    assert calibration.layers[name].entropy == pytest.approx(sum(entropies) / len(entropies), rel=1e-9)


def test_lm_head_only_when_asked(llava, samples):
    model, processor = llava
    with_head = calibrate(model, processor, samples[:1], candidates=(2, 8), lm_head=True, progress=False)
    assert list(with_head.layers) == [*llm_linears(model), "lm_head"]
    assert with_head.layers["lm_head"].errors[2] > with_head.layers["lm_head"].errors[8] > 0


def test_a_calibration_set_without_images_is_refused(llava):
    model, processor = llava
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hello"}]}], add_generation_prompt=True
    )
    with pytest.raises(ValueError, match="no image or video tokens"):
        calibrate(model, processor, [processor(text=[text], return_tensors="pt")], progress=False)
    with pytest.raises(ValueError, match="holding input_ids"):
        calibrate(model, processor, [{"pixel_values": torch.zeros(1, 3, 8, 8)}], progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"candidates": (2, 16)}, "distinct widths from 2, 3, 4, 8"),
        ({"candidates": ()}, "distinct widths"),
        ({"group": 48}, r"layers.0.self_attn.q_proj: group=48 must divide the 128 input channels"),
        ({"n": 0}, "n must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused(llava, kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate(*llava, progress=False, **kwargs)


def test_histogram_entropy_measures_shape_not_scale():
    assert float(histogram_entropy(torch.full((100,), 3.0))) == 0.0
    assert float(histogram_entropy(torch.tensor([-1.0, 1.0] * 50))) == pytest.approx(1.0, abs=1e-12)
    gaussian = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0))
    assert float(histogram_entropy(gaussian)) == pytest.approx(
        math.log2(16 * math.sqrt(2 * math.pi * math.e)), abs=0.01
    )
    assert float(histogram_entropy(gaussian * 1000 + 7)) == pytest.approx(float(histogram_entropy(gaussian)), abs=1e-3)
    sparse = gaussian * (torch.rand(gaussian.shape, generator=torch.Generator().manual_seed(1)) < 0.1)
    assert float(histogram_entropy(sparse)) < float(histogram_entropy(gaussian)) - 1


def test_calibration_round_trips_through_json(calibration, tmp_path):
    path = tmp_path / "calibration.json"
    calibration.to_json(path)
    assert Calibration.from_json(path) == calibration
    (tmp_path / "other.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(ValueError, match="is not a tokred calibration"):
        Calibration.from_json(tmp_path / "other.json")


def test_schemes_are_registered_for_the_weights_stage():
    assert METHODS["layerbits"] is LayerBits and METHODS["uniform_bits"] is UniformBits
    assert LayerBits.stage == UniformBits.stage == "weights"
    for scheme in (LayerBits(avg_bits=2.5, candidates=(16, 2, 4)), UniformBits(bits=3, group=32)):
        config = tokred.Config(weights=scheme)
        assert tokred.Config.parse(str(config)) == config
    assert LayerBits(candidates=(16, 2, 4)).candidates == (2, 4, 16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"avg_bits": 1.5}, "between the smallest candidate width, 2, and 16"),
        ({"avg_bits": 17}, "between the smallest candidate width"),
        ({"avg_bits": 2.5, "candidates": (3, 16)}, "between the smallest candidate width, 3"),
        ({"candidates": (2, 5)}, "widths from 2, 3, 4, 8, 16"),
        ({"candidates": (2, 2, 16)}, "distinct"),
        ({"group": 0}, "LayerBits.group must be an integer >= 1"),
    ],
)
def test_layerbits_checks_its_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerBits(**kwargs)


def test_layerbits_checks_its_field_types():
    with pytest.raises(TypeError, match="LayerBits.avg_bits must be a number, got '3'"):
        LayerBits(avg_bits="3")
    with pytest.raises(TypeError, match="LayerBits.calibration must be a path to a calibration JSON"):
        LayerBits(calibration=("runs", "calibration.json"))
    assert LayerBits(calibration=Path("runs") / "calibration.json").calibration == "runs/calibration.json"


def test_uniformbits_checks_its_fields_and_maps_every_llm_linear(llava):
    model, _ = llava
    with pytest.raises(ValueError, match="UniformBits.bits must be one of 2, 3, 4, 8"):
        UniformBits(bits=5)
    with pytest.raises(ValueError, match="UniformBits.group must be an integer >= 1"):
        UniformBits(group=True)
    assert UniformBits(bits=3).bit_map(model) == dict.fromkeys(llm_linears(model), 3)
    with pytest.raises(ValueError, match="q_proj: group=96 must divide the 128 input channels"):
        UniformBits(group=96).bit_map(model)
    idle = UniformBits(group=96).as_idle()
    assert idle.idle and idle.bits == 16 and idle.bit_map(model) == dict.fromkeys(llm_linears(model), 16)


def test_layerbits_allocates_from_a_saved_calibration(llava, calibration, tmp_path):
    model, _ = llava
    path = tmp_path / "calibration.json"
    calibration.to_json(path)
    scheme = LayerBits(avg_bits=2.5, calibration=path, candidates=(2, 3, 4, 8))
    bit_map = scheme.bit_map(model)
    assert bit_map == allocate(calibration, avg_bits=2.5, candidates=(2, 3, 4, 8)) and len(set(bit_map.values())) > 1
    with pytest.raises(ValueError, match="was measured at group=64; the scheme asks for group=32"):
        LayerBits(calibration=path, group=32).bit_map(model)
    narrow = dataclasses.replace(calibration, candidates=(2, 4))
    narrow.to_json(path)
    with pytest.raises(ValueError, match="measured widths 2, 4, not 3, 8"):
        scheme.bit_map(model)
    layers = dict(calibration.layers)
    del layers["model.language_model.layers.3.mlp.down_proj"]
    dataclasses.replace(calibration, layers=layers).to_json(path)
    with pytest.raises(
        ValueError, match="does not fit this model .* first 'model.language_model.layers.3.mlp.down_proj'"
    ):
        scheme.bit_map(model)
    q_proj = "model.language_model.layers.0.self_attn.q_proj"
    layers = {**calibration.layers, q_proj: dataclasses.replace(calibration.layers[q_proj], shape=(64, 128))}
    dataclasses.replace(calibration, layers=layers).to_json(path)
    with pytest.raises(ValueError, match=f"1 layers .* first '{q_proj}'"):
        scheme.bit_map(model)


def test_layerbits_calibrates_with_the_processor_beside_the_model(llava, monkeypatch, tmp_path):
    model, _ = llava
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path))
    bit_map = LayerBits(avg_bits=3.0).bit_map(model)
    (saved,) = (tmp_path / "calibrations").iterdir()  # measured once, then read back
    monkeypatch.setattr("tokred.weights.calibrate.calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
    assert LayerBits(avg_bits=3.0).bit_map(model) == bit_map and Calibration.from_json(saved).samples == 32
    params = {n: m.weight.numel() for n, m in llm_linears(model).items()}
    assert list(bit_map) == list(params)
    assert sum(params[n] * b for n, b in bit_map.items()) <= 3.0 * sum(params.values())
    assert LayerBits(avg_bits=3.0).as_idle().bit_map(model) == dict.fromkeys(params, 16)
    monkeypatch.setattr(model.config, "_name_or_path", "someone/remote-model")
    with pytest.raises(ValueError, match=r"'someone/remote-model'\) is not a local directory.*calibration=path"):
        LayerBits().bit_map(model)


def test_layerbits_idles_at_sixteen_bits():
    scheme = LayerBits(avg_bits=2.0, candidates=(2, 4))
    assert not scheme.idle
    idle = scheme.as_idle()
    assert idle.idle and idle.avg_bits == 16 and idle.candidates == (2, 4, 16)
    assert not LayerBits(avg_bits=16, candidates=(2, 8)).idle  # no width 16 to give
