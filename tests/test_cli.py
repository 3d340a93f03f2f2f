"""The `tokred` console command, run in-process."""

from __future__ import annotations

import re

import pytest
import torch

from tokred.cli import main


def test_info_lists_families_methods_and_presets(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert re.search(r"qwen3_vl\s+Qwen3VLForConditionalGeneration\s+fastv-50", out)
    assert re.search(r"fastv\s+llm", out) and re.search(r"random\s+pre_llm", out)
    assert "fastv-25         fastv:keep=0.25\n" in out and "none             no compression" in out


def test_run_reports_the_cut(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path))
    main(["run", "--family", "llava", "--recipe", "random-25", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert str(tmp_path) in out
    assert "input: [16]" in out and "pre_llm: [4]" in out
    assert "layer  0:" in out


def test_zoo_builds_into_a_directory(capsys, tmp_path):
    main(["zoo", "qwen2_vl", "--out", str(tmp_path / "q")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "q")
    assert (tmp_path / "q" / "model.safetensors").is_file()


@pytest.fixture
def no_loading(monkeypatch):
    """A --device error must come before the model loads."""

    def load(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr("tokred.zoo.load", load)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "demo"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_explained(capsys, no_loading, command, device):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", "shapes-llava", "--device", device])
    assert exit_info.value.code == 2
    expected = f"tokred {command}: error: --device {device}: no CUDA device is available; devices here: cpu\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:2", "--device cuda:2: CUDA device 2 does not exist; devices here: cpu, cuda:0, cuda:1"),
        ("gpu", "--device 'gpu' is not a device; use cpu, cuda, cuda:N or auto (here: cpu, cuda:0, cuda:1)"),
    ],
)
def test_a_device_this_machine_lacks_is_explained(capsys, monkeypatch, no_loading, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "shapes-llava", "--device", device])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"tokred eval: error: {message}\n"
