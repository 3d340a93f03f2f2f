"""`tokred eval`: the grid runner's measurements and the CLI's table, JSON, CSV and plot."""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import tokred
import tokred.eval.runner
from tokred import compat
from tokred.cli import main
from tokred.eval import STOCK, evaluate, grid, questions
from tokred.eval.tasks import takes
from tokred.methods import METHODS
from tokred.zoo import build, load
from tokred.zoo.prompts import chat
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
        assert stock.kv_bits_per_value == random.kv_bits_per_value == 32.0  # float32 DynamicCaches (the model's)
        assert stock.relative_accuracy in (1.0, None) and stock.ttft_ms > 0 and stock.decode_tokens_per_s > 0
        assert stock.peak_memory_mb is None  # CPU
        assert stock.smallest_accuracy is None or task == "shapes"


def test_runner_scores_like_training_on_the_same_questions(checkpoint):
    """Files on disk and samples drawn in memory give the same questions, prompts and answers."""
    model, processor = load(checkpoint)
    (row,) = evaluate(model, processor, [STOCK], ["shapes"], limit=6, batch_size=6)
    assert row.accuracy == accuracy(model, processor, "shapes", 6, seed=0, batch_size=6)["all"]
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
        (
            ["--methods", "prune-it", "--keep", "0.5"],
            f"unknown method.*prune-it.*methods are: {', '.join(sorted(METHODS))}$",
        ),
        (["--methods", "fastv"], "needs at least one --keep"),
        (
            ["--keep", "0.5"],
            r"--keep needs --methods, the methods to run at those ratios \(methods are: cdpruner, dart, divprune",
        ),
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


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--kv", "zipcache", "unknown kv scheme 'zipcache'; kv schemes are: none, int8, kivi, vidkv"),
        ("--weights", "random:keep=0.5", "unknown weights scheme 'random:keep=0.5'"),
    ],
)
def test_kv_and_weights_take_only_registered_schemes(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        main(["eval", flag, value])
    assert message in capsys.readouterr().err


def test_without_a_shipped_checkpoint_the_default_is_a_labelled_random_build(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tokred.zoo.available", lambda: [])  # as in an installation that ships none
    main(["eval", "--tasks", "shapes", "--recipes", "random-25", "--limit", "2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "warning: no trained checkpoint (shapes-qwen2_5_vl) is shipped" in printed
    assert json.loads((tmp_path / "results.json").read_text())["run"]["model"].endswith("qwen2_5_vl-s0")


def test_keep_without_methods_is_refused_by_grid():
    with pytest.raises(ValueError, match="--keep needs --methods"):
        grid(keeps=[0.5], recipes=["fastv-25"])


LLAVA_REFUSAL = (
    "task 'motion' asks about videos, which llava checkpoints do not take; tasks a llava checkpoint can run: shapes"
)


def test_a_family_without_video_is_refused_a_video_task_before_any_question(tmp_path, monkeypatch):
    model, processor = load(build("llava", tmp_path / "llava"))
    calls = []
    monkeypatch.setattr(tokred.eval.runner, "_answers", lambda *args: calls.append(args))
    with pytest.raises(ValueError, match=re.escape(LLAVA_REFUSAL)):
        evaluate(model, processor, [STOCK], ["shapes", "motion"], limit=2)
    assert calls == []
    assert takes("llava") == ("shapes",) and takes("qwen2_5_vl") == ("shapes", "motion")


def test_cli_refuses_a_video_task_before_loading(tmp_path, capsys, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr("tokred.zoo.load", load)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "shapes-llava", "--tasks", "shapes", "motion", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"tokred eval: error: {LLAVA_REFUSAL}\n"
    assert not (tmp_path / "out").exists()


def test_default_tasks_are_those_the_family_takes(tmp_path):
    path = build("llava", tmp_path / "llava")  # no card.json
    main(["eval", "--model", str(path), "--recipes", "fastv-25", "--limit", "2", "--out", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["run"]["tasks"] == ["shapes"]
    assert [(r["task"], r["setting"]) for r in data["rows"]] == [("shapes", "stock"), ("shapes", "fastv-25")]


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_a_failing_task_keeps_the_finished_results(checkpoint, tmp_path, capsys, monkeypatch, error):
    answers = tokred.eval.runner._answers

    def motion_fails(model, processor, asks, *args):
        if asks.name == "motion":
            raise error("boom")
        return answers(model, processor, asks, *args)

    monkeypatch.setattr(tokred.eval.runner, "_answers", motion_fails)
    out = tmp_path / "out"
    args = ["eval", "--model", str(checkpoint), "--tasks", "shapes", "motion", "--recipes", "fastv-25", "--limit", "2"]
    message = f"task 'motion' failed ({error.__name__}: boom); the results of shapes are in {out}"
    with pytest.raises(SystemExit if error is ValueError else RuntimeError) as raised:
        main([*args, "--out", str(out)])
    if error is ValueError:
        assert raised.value.code == 2 and capsys.readouterr().err.endswith(f"\ntokred eval: error: {message}\n")
    else:
        assert str(raised.value) == message
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["task"], r["setting"]) for r in rows] == [("shapes", "stock"), ("shapes", "fastv-25")]
    with (out / "results.csv").open() as f:
        assert [r["setting"] for r in csv.DictReader(f)] == ["stock", "fastv-25"]
    assert (out / "accuracy.png").stat().st_size > 0


def test_progress_off_a_terminal_is_one_line_per_setting(checkpoint, tmp_path, capfd):
    args = ["eval", "--model", str(checkpoint), "--tasks", "shapes", "motion", "--recipes", "fastv-25", "--limit", "2"]
    main([*args, "--batch-size", "1", "--out", str(tmp_path)])
    out, err = capfd.readouterr()
    assert "\r" not in out and "\r" not in err
    lines = re.findall(r"^(\w+)  (\S+)  2 questions  acc [01]\.\d{3}  \d+\.\d s$", err, re.MULTILINE)
    assert lines == [(t, s) for t in ("shapes", "motion") for s in ("stock", "fastv-25")]


def test_agreement_and_answer_kl_compare_with_stock():
    from tokred.eval.runner import compare

    def row(answers, accuracy):
        return tokred.eval.runner.Row(
            "shapes",
            "s",
            "m",
            1.0,
            len(answers),
            accuracy,
            None,
            None,
            None,
            None,
            None,
            {},
            0,
            0,
            0,
            0,
            None,
            0,
            0,
            answers,
        )

    stock, other = row(["red", "blue", "yes"], 0.5), row(["red", "star", "yes"], 0.25)
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]).log()
    q = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8]]).log()
    compare(other, q, stock, p)
    assert other.agreement == 2 / 3 and other.relative_accuracy == 0.5
    expected = (0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 3  # only the second answer differs
    assert other.answer_kl == pytest.approx(expected)


def test_target_recall_counts_the_tokens_of_the_objects_asked_about():
    """A hand-made 224 px scene on an 8x8 token grid: a 24 px square inside cell (1, 1), a 52 px circle over
    cells (4..5, 5..6); the question is about the square."""
    from tokred.eval.runner import target_counts
    from tokred.eval.tasks import Question
    from tokred.zoo.datasets.cells import coverage, target_tokens

    square = {"shape": "square", "colour": "red", "cx": 42, "cy": 42, "size": 24}
    circle = {"shape": "circle", "colour": "blue", "cx": 168, "cy": 140, "size": 52}
    record = {"objects": [square, circle], "targets": [0], "question": "what colour is the square?"}
    shares = coverage(record, (1, 8, 8), 224).reshape(2, 8, 8)
    assert shares[0].nonzero() == (np.array([1]), np.array([1])) and shares[0, 1, 1] == pytest.approx(24 * 24 / 784)
    assert sorted(zip(*shares[1].nonzero(), strict=True)) == [(4, 5), (4, 6), (5, 5), (5, 6)]
    assert target_tokens(record, (1, 8, 8), 224).nonzero()[0].tolist() == [9]
    both = dict(record, targets=[0, 1])
    assert target_tokens(both, (1, 8, 8), 224).nonzero()[0].tolist() == [9, 37, 38, 45, 46]

    question = Question(both, Image.new("RGB", (224, 224)))
    stats = tokred.Stats(media=[[("image", (1, 8, 8))]])
    stats.record("input", [torch.arange(10, 74)])  # the image's 64 tokens sit at input positions 10..73
    stats.record("pre_llm", [torch.tensor([19, 47, 48, 60])])  # keeps cell 9 and cells 37, 38 of the circle
    assert target_counts(stats, [question]) == {"input": (5, 5), "pre_llm": (3, 5)}
    nothing = Question(dict(record, targets=[]), question.media)  # e.g. "is there a green star?" -> no
    assert target_counts(stats, [nothing]) == {"input": (0, 0), "pre_llm": (0, 0)}


def test_rows_carry_agreement_kl_and_target_recall(checkpoint):
    model, processor = load(checkpoint)
    stock, random = evaluate(model, processor, grid(["random"], [0.25]), ["shapes"], limit=6, batch_size=3)
    assert stock.agreement is None and stock.answer_kl is None
    assert stock.target_recall == 1.0 and stock.target_recall_by_stage == {"input": 1.0}
    assert 0 <= random.agreement <= 1 and random.answer_kl >= 0
    assert set(random.target_recall_by_stage) == {"input", "pre_llm"}
    assert random.target_recall == random.target_recall_by_stage["pre_llm"] < 1.0


def test_an_answer_is_the_task_answer_the_output_starts_with():
    """What follows an answer (junk where a cut leaves the model unsure when to stop) is not part of it."""
    from tokred.zoo.prompts import leading_answer

    assert leading_answer("circlesssright", "shapes") == "circle"
    assert leading_answer(" bottomrightleft\n", "shapes") == "bottomright"
    assert leading_answer("upwards", "motion") == "up" and leading_answer("up", "shapes") == "up"
    assert leading_answer("the red one\nred", "shapes") == "the red one" and leading_answer("", "motion") == ""


def test_a_settings_keep_is_its_last_token_reducers():
    """A frames method keeps no budget of tokens: alone it is a keep of 1, and a reducer after it sets the keep."""
    _, alone, combined = grid(recipes=["temporal_dedup", "temporal_dedup+random:keep=0.25"])
    assert (alone.method, alone.keep) == ("temporal_dedup", 1.0)
    assert (combined.method, combined.keep) == ("temporal_dedup+random", 0.25)


def test_settings_with_a_kv_or_weight_scheme_say_so_in_their_names():
    settings = grid(recipes=["none", "fastv-25"], kv="kivi", weights="uniform_bits:bits=4")
    assert [s.name for s in settings] == ["stock", "none+kivi+uniform_bits:bits=4", "fastv-25+kivi+uniform_bits:bits=4"]
    assert [s.method for s in settings] == ["stock", "kivi+uniform_bits", "fastv+kivi+uniform_bits"]
    assert settings[1].config == tokred.Config(kv=tokred.KIVI(), weights=tokred.UniformBits(bits=4))


def test_kv_bits_per_value_count_a_packed_cache_as_it_counts_itself(checkpoint):
    from tokred.kv import cache_for
    from tokred.measure import kv_bits_per_value

    model, processor = load(checkpoint)
    inputs = processor(
        images=[Image.new("RGB", (56, 56))] * 2, text=[chat(processor, "shapes", "q?")] * 2, return_tensors="pt"
    )
    cache = cache_for(model, tokred.KIVI(bits=2, group=8, residual=8))
    model.generate(**inputs, max_new_tokens=12, do_sample=False, **{compat.cache_argument(model): cache})
    config = model.config.get_text_config(decoder=True)
    assert kv_bits_per_value(cache, config, 2) == cache.bits_per_value() < 32  # below float32 even with the window
