"""The training script's pieces: labels cover exactly the answers, probe targets follow the scene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoProcessor

from tokred.zoo import build
from tokred.zoo.datasets import COLOURS, SHAPES, sample
from tokred.zoo.prompts import chat
from tokred.zoo.train import Batches, batch_inputs, probe_targets, token_grid, turns_for


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("kind", ["shapes", "motion"])
def test_labels_are_the_answer_tokens_of_every_turn(tmp_path, family, kind):
    if family == "llava" and kind == "motion":
        pytest.skip("LLaVA-1.5 takes no video")
    processor = AutoProcessor.from_pretrained(build(family, tmp_path / family))
    rng = np.random.default_rng(0)
    records = [sample(kind, "train", i) for i in range(3)]
    items = [(turns_for(kind, r, rng, limit), m) for limit, (r, m) in zip((1, 3, 4), records, strict=True)]
    inputs = batch_inputs(processor, kind, items, train=True)
    eos = processor.tokenizer.eos_token
    for b, (turns, _) in enumerate(items):
        target = inputs["labels"][b][inputs["labels"][b] != -100]
        assert processor.tokenizer.decode(target) == "".join(t["answer"] + eos for t in turns)
    assert [len(t) for t, _ in items] == [1, 3, 4]
    prompts = batch_inputs(processor, kind, items, train=False)
    assert "labels" not in prompts
    text = processor.decode(prompts["input_ids"][2], skip_special_tokens=False)
    first, second = items[2][0][:2]
    assert first["question"] in text and second["question"] not in text
    assert text.endswith(chat(processor, kind, first["question"]).split(first["question"])[-1])


def test_turns_start_with_the_record_and_never_repeat():
    rng = np.random.default_rng(0)
    for i in range(20):
        record, _ = sample("shapes", "train", i)
        turns = turns_for("shapes", record, rng, 5)
        assert turns[0] is record and 1 <= len(turns) <= 5
        assert len({t["question"] for t in turns}) == len(turns)


def test_probe_targets_mark_each_object_in_its_cells():
    record, image = sample("shapes", "train", 0)
    targets = probe_targets(record, (1, 16, 16), image.width).reshape(16, 16, 4)
    cell = image.width / 16
    centres = {(int(o["cy"] // cell), int(o["cx"] // cell)) for o in record["objects"]}
    assert int(targets[..., 2].sum()) == len(centres)
    for o in record["objects"]:
        row, col = int(o["cy"] // cell), int(o["cx"] // cell)
        colour, shape = list(COLOURS).index(o["colour"]) + 1, SHAPES.index(o["shape"]) + 1
        assert targets[row, col, :3].tolist() == [colour, shape, 1]
        covered = ((targets[..., 0] == colour) & (targets[..., 1] == shape)).sum()
        assert covered >= max(1, (o["size"] // cell) ** 2 * 0.5)
    assert (targets[..., 0] == 0).float().mean() > 0.4  # most cells are background
    assert targets[0, 0, 3] == 0 and targets[0, 15, 3] == 1 and targets[15, 0, 3] == 2 and targets[8, 8, 3] == 3


def test_probe_targets_follow_a_clip_over_time():
    record, frames = sample("motion", "train", 1)
    targets = probe_targets(record, (8, 8, 8), frames[0].width).reshape(8, 8, 8, 4)
    for slot in range(8):
        visible = [o for o in record["objects"] if o["appear"] <= 2 * slot < o["disappear"]]
        assert 1 <= int(targets[slot, ..., 2].sum()) <= len(visible)
        for o in visible:
            x, y = o["track"][2 * slot]
            assert targets[slot, int(y // 28), int(x // 28), 1] == SHAPES.index(o["shape"]) + 1


def test_token_grid():
    _, frames = sample("motion", "train", 0)
    assert token_grid(128, frames) == (8, 4, 4)
    assert token_grid(256, frames[0]) == (1, 16, 16)
    with pytest.raises(ValueError, match="not 8 square grids"):
        token_grid(100, frames)


def test_batches_are_the_same_stream_for_any_number_of_workers(tmp_path):
    processor = AutoProcessor.from_pretrained(build("qwen2_5_vl", tmp_path / "q"))
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    batches = Batches(processor, ["shapes", "motion"], 2, 3, seed=0, first=10, vision_ids=ids)
    alone = [batches.batch(step) for step in range(4)]
    loader = DataLoader(batches, batch_size=None, num_workers=2)
    for (kind, inputs, targets), (kind2, inputs2, targets2) in zip(alone, loader, strict=False):
        assert (
            kind == kind2 and torch.equal(inputs["input_ids"], inputs2["input_ids"]) and torch.equal(targets, targets2)
        )
        assert int((inputs["labels"] != -100).sum()) > 0
    assert [kind for kind, _, _ in alone] == ["shapes", "motion", "shapes", "motion"]
    n_shapes = int((alone[0][1]["input_ids"] == ids[0]).sum())
    assert len(alone[0][2]) == n_shapes  # one probe target row per vision token
