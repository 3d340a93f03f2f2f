"""Loading checkpoints by name or path, and the errors for unknown names and broken directories."""

from __future__ import annotations

import pytest

from tokred.zoo import available, build, load


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
    """Every shipped checkpoint reproduces its card's test accuracy (same 200 questions) within 2 points."""
    from tokred.zoo import card
    from tokred.zoo.train import accuracy

    model, processor = load(name)
    stated = card(name)
    for task, expected in stated["test_accuracy"].items():
        measured = accuracy(model, processor, task, stated["eval_questions"], stated["seed"])
        assert abs(measured - expected) <= 0.02, (task, measured, expected)
