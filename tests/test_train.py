"""The training script's batches: labels cover exactly the answer and its end token."""

from __future__ import annotations

import pytest
from transformers import AutoProcessor

from tokred.zoo import build
from tokred.zoo.datasets import sample
from tokred.zoo.train import batch_inputs


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
@pytest.mark.parametrize("kind", ["shapes", "motion"])
def test_labels_are_the_answer_tokens(tmp_path, family, kind):
    processor = AutoProcessor.from_pretrained(build(family, tmp_path / family))
    items = [sample(kind, "train", i) for i in range(3)]
    inputs = batch_inputs(processor, kind, items, train=True)
    eos = processor.tokenizer.eos_token
    for b, (record, _) in enumerate(items):
        target = inputs["labels"][b][inputs["labels"][b] != -100]
        assert processor.tokenizer.decode(target) == record["answer"] + eos
    assert int((inputs["labels"] != -100).sum()) < inputs["input_ids"].numel() // 10
