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
    records = [sample(kind, "train", i) for i in (0, 1, 3)]  # scenes with at least 3 other questions
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


def test_probe_targets_weigh_each_object_by_the_pixels_it_covers():
    record, image = sample("shapes", "train", 0)
    weights, labels, quadrants = probe_targets(record, (1, 16, 16), image.width)
    assert weights.shape == (len(record["objects"]), 256) and quadrants.shape == (256,)
    pixels = np.asarray(image).astype(int)
    for o, w, label in zip(record["objects"], weights, labels, strict=True):
        assert label.tolist() == [list(COLOURS).index(o["colour"]), SHAPES.index(o["shape"])]
        # The weights are the share of each 28 px cell painted in the object's exact colour.
        painted = (pixels == COLOURS[o["colour"]]).all(-1)
        box = np.zeros_like(painted)
        half = o["size"] // 2 + 1
        box[o["cy"] - half : o["cy"] + half + 1, o["cx"] - half : o["cx"] + half + 1] = True
        share = torch.from_numpy(painted & box).float().reshape(16, 28, 16, 28).mean(dim=(1, 3)).reshape(-1)
        torch.testing.assert_close(w, share)
    quadrants = quadrants.reshape(16, 16)
    assert [quadrants[0, 0], quadrants[0, 15], quadrants[15, 0], quadrants[8, 8], quadrants[7, 8]] == [0, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="does not tile a 448 px square"):
        probe_targets(record, (1, 15, 15), image.width)


def test_probe_targets_follow_a_clip_over_time():
    record, frames = sample("motion", "train", 3)
    weights, labels, _ = probe_targets(record, (8, 8, 8), frames[0].width)
    rows = iter(zip(weights.reshape(-1, 8, 8, 8), labels, strict=True))
    for o in record["objects"]:
        for slot in range(8):
            if not o["appear"] <= 2 * slot < o["disappear"]:
                continue
            w, label = next(rows)
            assert label[1] == SHAPES.index(o["shape"])
            assert w.sum(dim=(1, 2)).nonzero().flatten().tolist() == [slot]  # only its own slot
            x, y = o["track"][2 * slot]
            assert w[slot, y // 28, x // 28] > 0  # the cell holding its centre in that frame
    assert next(rows, None) is None


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
        assert kind == kind2 and torch.equal(inputs["input_ids"], inputs2["input_ids"])
        assert all(torch.equal(a, b) for a, b in zip(targets, targets2, strict=True))
        assert int((inputs["labels"] != -100).sum()) > 0
    assert [kind for kind, _, _ in alone] == ["shapes", "motion", "shapes", "motion"]
    weights, labels, quadrants = alone[0][2]
    n_shapes = int((alone[0][1]["input_ids"] == ids[0]).sum())
    assert weights.shape[1] == len(quadrants) == n_shapes  # one probe column per vision token, in batch order
    objects = sum(len(sample("shapes", "train", 10 + i)[0]["objects"]) for i in range(2))
    assert len(labels) == weights.shape[0] == objects  # one row per object of the two images
