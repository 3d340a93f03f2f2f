"""Loading checkpoints by name or path, the errors for unknown names and broken directories, and what the shipped
checkpoints must show: their cards reproduce, they need the image, and the asked-about objects' tokens decide."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokred
from tokred import zoo
from tokred.adapters import adapter_for
from tokred.zoo import available, build, datasets, load


def test_unknown_name_lists_the_shipped_ones():
    with pytest.raises(ValueError, match=r"no checkpoint named or at 'shapes-blip2'; shipped checkpoints: ") as error:
        load("shapes-blip2")
    for name in available():
        assert name in str(error.value)


def test_load_by_path(tmp_path):
    model, processor = load(build("qwen2_vl", tmp_path / "q"))
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration" and not model.training
    assert processor.tokenizer.decode(processor.tokenizer("what shape").input_ids) == "what shape"


@pytest.mark.parametrize("damage", ["config", "weights", "empty"])
def test_a_broken_checkpoint_says_so(tmp_path, damage):
    path = build("llava", tmp_path / "l")
    if damage == "config":
        (path / "config.json").write_text("{not json")
    elif damage == "weights":
        (path / "model.safetensors").write_bytes(b"\\x00" * 64)
    else:
        for file in path.iterdir():
            file.unlink()
    with pytest.raises(ValueError, match=rf"{path} is not a loadable checkpoint"):
        load(path)


@pytest.mark.parametrize("name", available())
def test_shipped_accuracy_matches_its_card(name):
    """Every shipped checkpoint reproduces its card's test accuracy (same 200 questions) within 2 points,
    overall and per question type."""
    from tokred.zoo import card
    from tokred.zoo.train import accuracy

    model, processor = load(name)
    stated = card(name)
    for task, expected in stated["test_accuracy"].items():
        measured = accuracy(model, processor, task, stated["eval_questions"], stated["seed"])
        assert measured.keys() == expected.keys()
        for kind in expected:
            assert abs(measured[kind] - expected[kind]) <= 0.02, (task, kind, measured, expected)


def prior(task: str, n_test: int = 200, n_train: int = 2000, seed: int = 0) -> float:
    """Accuracy without the image: each test question answered with the commonest train answer to the same
    question text (else to its type)."""
    by_text, by_type = {}, {}
    for i in range(n_train):
        record = datasets.sample(task, "train", i, seed)[0]
        by_text.setdefault(record["question"], Counter())[record["answer"]] += 1
        by_type.setdefault(record["type"], Counter())[record["answer"]] += 1
    right = 0
    for i in range(n_test):
        record = datasets.sample(task, "test", i, seed)[0]
        guess = by_text.get(record["question"], by_type[record["type"]]).most_common(1)[0][0]
        right += guess == record["answer"]
    return right / n_test


@pytest.mark.parametrize("name", available())
def test_answering_needs_the_image(name):
    """Given another question's image, a shipped model scores no better than the blind prior plus 5 points."""
    from tokred.zoo import card
    from tokred.zoo.train import accuracy

    model, processor = load(name)
    stated = card(name)
    for task in stated["tasks"]:
        shuffled = accuracy(model, processor, task, stated["eval_questions"], stated["seed"], shuffle=True)["all"]
        assert shuffled <= prior(task, stated["eval_questions"]) + 0.05, (task, shuffled)


@dataclass(frozen=True)
class Cells(tokred.TokenReducer):
    """Keeps the given token cells of the one image (test only: the oracle of the asked-about objects)."""

    name: ClassVar[str] = "cells"
    stage: ClassVar[str] = "pre_llm"
    cells: tuple[int, ...] = ()

    def select(self, tokens, k, generator):
        return torch.tensor(self.cells)


@pytest.mark.parametrize("name", [n for n in available() if "shapes" in zoo.card(n)["tasks"]])
def test_the_tokens_of_the_asked_objects_carry_the_answer(name):
    """Keeping only the tokens of the objects a question names keeps the stock answer's accuracy (within 5
    points); as many random tokens lose at least 15 points."""
    from tokred.zoo.datasets.cells import target_tokens
    from tokred.zoo.prompts import generate_answers
    from tokred.zoo.train import media_grid

    model, processor = load(name)
    vision_ids = list(adapter_for(model).token_ids().values())
    scores = {"stock": [], "targets": [], "random": []}
    for i in range(150):
        record, image = datasets.sample("shapes", "test", i)
        if not record["targets"]:
            continue
        cells = tuple(
            target_tokens(record, media_grid(processor, "shapes", image, vision_ids), image.width).nonzero()[0]
        )
        for setting, config in (
            ("stock", "none"),
            ("targets", Cells(keep_tokens=len(cells), cells=tuple(int(c) for c in cells))),
            ("random", tokred.Random(keep_tokens=len(cells), seed=i)),
        ):
            with tokred.patched(model, config):
                (answer,), _ = generate_answers(model, processor, "shapes", [record["question"]], [image], 6)
            scores[setting].append(answer.strip() == record["answer"])
    accuracy = {setting: sum(s) / len(s) for setting, s in scores.items()}
    assert accuracy["targets"] >= accuracy["stock"] - 0.05, accuracy
    assert accuracy["random"] <= accuracy["targets"] - 0.15, accuracy
