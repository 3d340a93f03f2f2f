"""The `tokred` console command, run in-process."""

from __future__ import annotations

import re

from tokred.cli import main


def test_info_lists_families_methods_and_presets(capsys):
    main(["info"])
    out = capsys.readouterr().out
    assert re.search(r"qwen3_vl\s+Qwen3VLForConditionalGeneration\s+fastv-50", out)
    assert re.search(r"fastv\s+llm", out) and re.search(r"random\s+pre_llm", out)
    assert "fastv-25         FastV(keep=0.25, keep_tokens=None, layer=2)" in out


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
