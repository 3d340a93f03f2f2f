"""Loading checkpoints by name or path, the errors for unknown names and broken directories, and what the shipped
checkpoints must show: their cards reproduce and they need the image."""

from __future__ import annotations

from collections import Counter

import pytest

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
    """Every shipped checkpoint reproduces its card's test accuracy (same 200 questions) within 2 points, and
    its card lists the same question types."""
    from tokred.zoo import card
    from tokred.zoo.train import accuracy

    model, processor = load(name)
    stated = card(name)
    for task, expected in stated["test_accuracy"].items():
        measured = accuracy(model, processor, task, stated["eval_questions"], stated["seed"])
        assert measured.keys() == expected.keys()
        assert abs(measured["all"] - expected["all"]) <= 0.02, (task, measured, expected)


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
