"""What every adapter answers beyond spans: the parts of the model the stages reach, and the family's facts."""

from __future__ import annotations

import torch
from torch import nn

import tokred
from tokred.adapters import ADAPTERS, adapter_for
from tokred.stages.call import LAST_QUERY
from tokred.zoo import FAMILIES


def test_every_family_has_an_adapter_and_a_zoo_builder():
    assert sorted(a.family for a in ADAPTERS) == sorted(FAMILIES)
    for adapter in ADAPTERS:
        assert tokred.Config.parse(adapter.recommended) and adapter.lmms_base and adapter.model_classes


def test_the_vision_parts_are_where_the_adapter_says(tiny):
    adapter, vision = adapter_for(tiny.model), tiny.model.config.vision_config
    depth = getattr(vision, "depth", None) or vision.num_hidden_layers
    assert isinstance(adapter.vision_blocks, nn.ModuleList) and len(adapter.vision_blocks) == depth
    assert all(any(b is m for m in adapter.vision_tower.modules()) for b in adapter.vision_blocks)
    outputs = []
    handle = adapter.projector.register_forward_hook(lambda module, args, out: outputs.append(out))
    try:
        tiny.model(**tiny.image())
    finally:
        handle.remove()
    (out,) = outputs
    out = getattr(out, "pooler_output", out)  # Qwen3-VL's merger returns its rows directly
    assert out.shape[-1] == tiny.model.config.get_text_config().hidden_size
    assert adapter.attention(1) is adapter.layers[1].self_attn


def test_the_llm_stage_posts_its_scores_for_later_stages(tiny):
    inputs = tiny.batch()
    with tokred.patched(tiny.model, tokred.FastV(layer=1, keep=0.25)):
        tiny.model(**inputs)
        call = tiny.model._tokred_session.call
        kept = tokred.stats(tiny.model).kept_positions["llm"]
    scores = call.signals[LAST_QUERY]
    assert scores.shape == inputs["input_ids"].shape
    torch.testing.assert_close(scores.sum(1), torch.ones(scores.shape[0]))  # each row is one softmax
    image = tiny.model.config.image_token_id
    for b, ids in enumerate(inputs["input_ids"]):
        vision = (ids == image).nonzero()[:, 0]
        top = vision[scores[b, vision].topk(len(kept[b])).indices].sort().values
        assert torch.equal(top, kept[b])
