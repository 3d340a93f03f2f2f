"""`tokred eval`: the grid runner's measurements and the CLI's table, JSON, CSV and plot."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
from PIL import Image

from tokred.cli import main
from tokred.eval import STOCK, evaluate, grid, questions
from tokred.zoo import build, load
from tokred.zoo.train import accuracy


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build("qwen2_5_vl", tmp_path_factory.mktemp("ckpt") / "qwen2_5_vl")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_kept_tokens_kv_and_accuracy_are_measured(checkpoint):
    model, processor = load(checkpoint)
    rows = evaluate(model, processor, grid(["random"], [0.5]), ["shapes", "motion"], limit=4, batch_size=2)
    assert [(r.task, r.setting) for r in rows] == [
        (t, s) for t in ("shapes", "motion") for s in ("stock", "random keep 0.5")
    ]
    for task in ("shapes", "motion"):
        stock, random = (r for r in rows if r.task == task)
        n = stock.vision_tokens_in
        assert stock.vision_tokens_kept == n and random.vision_tokens_in == n
        assert random.vision_tokens_kept == math.floor(n * 0.5 + 0.5)  # same media size, so one count per question
        assert random.kv_bytes < stock.kv_bytes and stock.questions == random.questions == 4
        assert stock.relative_accuracy in (1.0, None) and stock.ttft_ms > 0 and stock.decode_tokens_per_s > 0
        assert stock.peak_memory_mb is None  # CPU
        assert stock.smallest_accuracy is None or task == "shapes"


def test_runner_scores_like_training_on_the_same_questions(checkpoint):
    """Files on disk and samples drawn in memory give the same questions, prompts and answers."""
    model, processor = load(checkpoint)
    (row,) = evaluate(model, processor, [STOCK], ["shapes"], limit=6, batch_size=6)
    assert row.accuracy == accuracy(model, processor, "shapes", 6, seed=0, batch_size=6)
    assert [q.record["id"] for q in questions("shapes", 6)] == [f"test_{i:06d}" for i in range(6)]


def test_cli_outputs_exist_and_agree(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", "--model", str(checkpoint), "--methods", "fastv", "--keep", "0.5", "0.25", "--tasks", "shapes"]
    main([*args, "--limit", "4", "--batch-size", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    rows = data["rows"]
    assert [r["setting"] for r in rows] == ["stock", "fastv keep 0.5", "fastv keep 0.25"]
    expected = [q.answer for q in questions("shapes", 4)]
    for row in rows:
        assert sum(a == b for a, b in zip(row["answers"], expected, strict=True)) == 4 * row["accuracy"]
    assert data["run"]["methods"] == ["fastv"] and data["run"]["keep"] == [0.5, 0.25]
    assert {"torch", "transformers", "tokred", "device"} <= set(data["environment"])
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == [r["setting"] for r in rows]
    for from_csv, from_json in zip(table, rows, strict=True):
        assert float(from_csv["accuracy"]) == from_json["accuracy"]
        assert float(from_csv["vision_tokens_kept"]) == from_json["vision_tokens_kept"]
        assert f"| shapes | {from_json['setting']} | {from_json['accuracy']:.3f} |" in printed
    assert [r["vision_tokens_kept"] for r in rows] == sorted((r["vision_tokens_kept"] for r in rows), reverse=True)
    with Image.open(out / "accuracy.png") as image:
        assert image.format == "PNG" and image.width > 400 and len(image.getcolors(1 << 16) or []) > 10


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "prune-it", "--keep", "0.5"], "unknown method.*prune-it.*fastv, random"),
        (["--methods", "fastv"], "needs at least one --keep"),
        (["--methods", "fastv", "--keep", "1.5"], "keep.*1.5"),
        (["--recipes", "fastv-99"], "unknown recipe.*fastv-99.*fastv-50"),
        (["--tasks", "mme"], "unknown local task 'mme'.*shapes, motion.*lmms-eval"),
        (["--limit", "0"], "limit must be >= 1"),
    ],
)
def test_bad_input_is_explained(checkpoint, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(checkpoint), "--tasks", "shapes", *args, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_unknown_checkpoint_lists_the_shipped_ones(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "no-such-model"])
    assert "no checkpoint named or at 'no-such-model'; shipped checkpoints:" in capsys.readouterr().err


def test_kv_and_weights_take_only_none_for_now(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--kv", "vidkv"])
    assert "invalid choice: 'vidkv'" in capsys.readouterr().err


def test_without_a_shipped_checkpoint_the_default_is_a_labelled_random_build(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tokred.zoo.available", lambda: [])  # as in an installation that ships none
    main(["eval", "--tasks", "shapes", "--recipes", "random-25", "--limit", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "warning: no trained checkpoint (shapes-motion-qwen2_5_vl) is shipped" in printed
    assert json.loads((tmp_path / "results.json").read_text())["run"]["model"].endswith("qwen2_5_vl-s0")
