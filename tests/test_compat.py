"""Each transformers seam tokred reaches through (tokred.compat.SEAMS), checked on every family's real model.

A release that moves a seam fails here with the seam's name in the message, before the behaviour tests
fail somewhere downstream.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Cache, DynamicCache

import tokred
from tokred import compat
from tokred.adapters import adapter_for


def record_calls(module, calls: list):
    """A forward pre-hook that keeps each call's keyword arguments."""
    return module.register_forward_pre_hook(lambda m, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True)


def test_every_seam_is_tested():
    tested = {name.removeprefix("test_").replace("_", " ") for name in globals() if name.startswith("test_")}
    assert set(compat.SEAMS) <= tested, f"seams without a test: {set(compat.SEAMS) - tested}"


def test_cache_argument(tiny):
    adapter = adapter_for(tiny.model)
    name = compat.cache_argument(adapter.language_model)
    modules = [tiny.model, adapter.outer, adapter.layers[0], adapter.layers[0].self_attn]
    assert [compat.cache_argument(m) for m in modules] == [name] * 4, "seam 'cache argument': names differ"
    calls: list = []
    hook = record_calls(adapter.language_model, calls)
    try:
        tiny.model.generate(**tiny.image(), max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    caches = [compat.passed_cache(kwargs, name) for kwargs in calls]
    assert all(isinstance(c, Cache) for c in caches), f"seam 'cache argument': generate passed no {name!r}"
    assert caches[0] is caches[1], "seam 'cache argument': decode steps got another cache than the prefill"


def test_cache_layer(tiny):
    from tokred.kv import QuantizedKVLayer, cache_for

    assert issubclass(QuantizedKVLayer, compat.cache_layer())
    assert not QuantizedKVLayer.__abstractmethods__, "seam 'cache layer': transformers added abstract methods"
    cache = cache_for(tiny.model, tokred.KIVI(group=8, residual=8))
    tiny.model.generate(**tiny.image(), max_new_tokens=2, do_sample=False, **{compat.cache_argument(tiny.model): cache})
    length = cache.get_seq_length()
    assert length > 0 and cache.get_mask_sizes(1, 0) == (length + 1, 0)
    assert not any(cache.is_sliding) and cache.is_croppable and not cache.is_compileable


def test_cache_argument_refuses_a_cache_it_cannot_name(tiny):
    with pytest.raises(compat.SeamError, match="'cache argument'.*arrived as 'kv_store'"):
        compat.passed_cache({"kv_store": DynamicCache()}, "cache")
    with tokred.patched(tiny.model, "random-50"):  # the hook says so too, instead of taking it for a prefill
        lm = adapter_for(tiny.model).language_model
        with pytest.raises(compat.SeamError, match="cache argument"):
            lm(inputs_embeds=torch.zeros(1, 3, lm.config.hidden_size), kv_store=DynamicCache())


def test_output_cache(tiny):
    out = tiny.model.generate(**tiny.image(), max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    assert isinstance(compat.output_cache(out), Cache), "seam 'output cache': generate() returned none"
    assert isinstance(compat.output_cache(tiny.model(**tiny.image(), use_cache=True)), Cache)
    assert compat.output_cache(tiny.model(**tiny.image(), use_cache=False)) is None
    with pytest.raises(compat.SeamError, match="output cache"):
        compat.output_cache(object())


def test_forward_arguments(tiny):
    inputs = tiny.image()
    outer = adapter_for(tiny.model).outer
    bound = compat.forward_arguments(outer, (inputs["input_ids"],), {"attention_mask": inputs["attention_mask"]})
    assert bound["input_ids"] is inputs["input_ids"] and bound["attention_mask"] is inputs["attention_mask"]


def test_attention_implementation(tiny):
    config = adapter_for(tiny.model).text_config
    assert compat.attention_implementation(config) == "sdpa"
    patched = compat.with_attention_function(config, "tokred_capture")
    assert patched._attn_implementation == "tokred_capture" and config._attn_implementation == "sdpa"


def test_attention_registry(tiny):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attention = adapter_for(tiny.model).layers[0].self_attn
    assert compat.attention_kernel(attention, "sdpa") is sdpa_attention_forward
    assert compat.attention_kernel(attention, "tokred_capture").__module__ == "tokred.stages.llm"
    with pytest.raises(compat.SeamError, match="attention registry"):
        compat.attention_kernel(attention, "no_such_kernel")


def test_eager_attention(tiny):
    attention = adapter_for(tiny.model).layers[0].self_attn
    kernel = compat.attention_kernel(attention, "eager")
    assert kernel.__name__ == "eager_attention_forward" and kernel.__module__ == type(attention).__module__


def test_media_features(tiny):
    """The Qwen adapters record each get_*_features call's grids, LLaVA-OneVision's its image sizes."""
    adapter = adapter_for(tiny.model)
    if tiny.family == "llava":
        pytest.skip("the LLaVA adapter records no get_*_features arguments")
    name = "image_sizes" if tiny.family == "llava_onevision" else "image_grid_thw"
    seen: list = []
    undo = compat.wrap_media_features(adapter.outer, "image", lambda arguments: seen.append(arguments), (name,))
    try:
        inputs = tiny.image()
        tiny.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        undo()
    assert len(seen) == 1 and torch.equal(seen[0][name], inputs[name]), "seam 'media features'"
    assert "get_image_features" not in vars(adapter.outer)


def test_onevision_layout(tiny):
    """Scores laid out by the model's own packing and pooling land one per image or video token."""
    if tiny.family != "llava_onevision":
        pytest.skip("only LLaVA-OneVision packs anyres views and pools video frames")
    outer, config = adapter_for(tiny.model).outer, tiny.model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    inputs = tiny.batch()
    views = sum(
        image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        for size in inputs["image_sizes"]
    )
    scores = compat.onevision_image_scores(outer, torch.ones(views, side * side), dict(inputs))
    with pytest.raises(compat.SeamError, match="onevision layout"):
        compat.onevision_image_scores(outer, torch.ones(views + 1, side * side), dict(inputs))
    counts = (inputs["input_ids"] == config.image_token_id).sum(1).tolist()
    assert [len(s) for s in scores] == counts, "seam 'onevision layout'"
    video = tiny.video()
    frames = video["pixel_values_videos"].shape[1]
    (pooled,) = compat.onevision_video_scores(outer, torch.ones(frames, side * side), dict(video))
    assert len(pooled) == int((video["input_ids"] == config.video_token_id).sum()), "seam 'onevision layout'"
    assert pooled[-1] == 0 and bool((pooled[:-1] == 1).all())
    clips = compat.onevision_clips(dict(video))
    regions = compat.onevision_frame_regions(outer, clips, config.vision_config.patch_size)
    assert regions.shape[:2] == clips.shape[:2] and regions.shape[3] == 3 * config.vision_config.patch_size**2
    assert regions.shape[1] * regions.shape[2] == len(pooled) - 1, "seam 'onevision layout': a row per frame token"
    flat = clips.reshape(-1, *clips.shape[2:])  # a frame of one colour pools to that colour in every region
    flat[0] = 0.25
    assert torch.equal(
        compat.onevision_frame_regions(outer, clips, config.vision_config.patch_size)[0, 0],
        torch.full_like(regions[0, 0], 0.25),
    )


def test_given_media_features(tiny):
    """The model takes features handed to get_*_features in place of its tower's."""
    if tiny.family == "qwen3_vl":
        pytest.skip("Qwen3-VL's features carry deepstack features as well; none can be handed in")
    adapter, inputs = adapter_for(tiny.model), tiny.image()
    rows = torch.randn(
        int((inputs["input_ids"] == tiny.model.config.image_token_id).sum()), adapter.text_config.hidden_size
    )
    seen = []
    hook = adapter.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"]), with_kwargs=True
    )
    undo = compat.given_media_features(adapter.outer, "image", lambda: rows)
    try:
        tiny.model(**inputs)
    finally:
        undo(), hook.remove()
    vision = inputs["input_ids"] == tiny.model.config.image_token_id
    torch.testing.assert_close(seen[0][vision], rows, msg="seam 'media features': given rows did not reach the LLM")
    assert "get_image_features" not in vars(adapter.outer)


def test_vision_window_index(tiny):
    """The tower holds its merged groups in window order: merging its last hidden states and undoing the order
    gives the features it returns."""
    if tiny.family != "qwen2_5_vl":
        pytest.skip("only Qwen2.5-VL's tower attends in windows")
    tower, inputs = adapter_for(tiny.model).vision_tower, tiny.image()
    out = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], return_dict=True)
    order = compat.window_order(tower, inputs["image_grid_thw"])
    assert sorted(order.tolist()) == list(range(len(out.pooler_output))), "seam 'vision window index'"
    torch.testing.assert_close(tower.merger(out.last_hidden_state)[torch.argsort(order)], out.pooler_output)


def test_vision_block_call(tiny):
    """Each Qwen tower block gets the packed-sequence ends and the rotary rows as keywords; cut to a subset of
    patches, they describe that subset (its segments recounted, the empty ones gone)."""
    adapter = adapter_for(tiny.model)
    if not adapter.patch_groups:
        pytest.skip("only towers that take patch groups are called block by block with packed sequences")
    inputs = tiny.video()  # a packed segment per frame (or per window)
    calls: list = []
    hook = record_calls(adapter.vision_blocks[0], calls)
    try:
        tiny.model(**inputs)
    finally:
        hook.remove()
    (kwargs,) = calls
    assert set(compat.VISION_BLOCK_KWARGS) <= set(kwargs), f"seam 'vision block call': got {sorted(kwargs)}"
    n, ends = kwargs["position_embeddings"][0].shape[0], kwargs["cu_seqlens"]
    first = int(ends[1])  # drop the first packed segment (a frame, or a window) and half a patch of the next
    keep = torch.ones(n, dtype=torch.bool)
    keep[: first + 1] = False
    before = torch.nn.functional.pad(keep.long().cumsum(0), (1, 0))
    hidden = torch.randn(n, 4)
    (cut,), out = compat.ragged_block_call((hidden,), kwargs, keep, before, {})
    assert torch.equal(cut, hidden[first + 1 :]) and torch.equal(
        out["position_embeddings"][0], kwargs["position_embeddings"][0][keep]
    )
    expected = [0, *(ends[2:] - first - 1).tolist()]
    assert out["cu_seqlens"].tolist() == expected and out.get("max_seqlen") is None


def test_pre_encoded_media(tiny):
    """generate() hands the outer model either the raw pixels or media it encoded ahead; tokred reads both."""
    adapter = adapter_for(tiny.model)
    calls: list = []
    hook = record_calls(adapter.outer, calls)
    inputs = tiny.image()
    try:
        tiny.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    prefill = calls[0]
    encoded = compat.encoded_media(prefill, "image")
    tokens = int((inputs["input_ids"] == tiny.model.config.image_token_id).sum())
    if encoded is None:
        assert prefill.get("pixel_values") is not None, "seam 'pre encoded media': neither pixels nor encoded media"
    else:
        assert sum(len(x) for x in encoded) == tokens, "seam 'pre encoded media': feature rows != image tokens"


def test_deepstack(tiny):
    if tiny.family != "qwen3_vl":
        pytest.skip("deepstack is Qwen3-VL's")
    lm = adapter_for(tiny.model).language_model
    seen: list = []

    def wrapper(stock, hidden_states, visual_pos_masks, visual_embeds):
        seen.append((hidden_states.shape, visual_pos_masks.shape, visual_embeds.shape))
        return stock(hidden_states, visual_pos_masks, visual_embeds)

    undo = compat.wrap_deepstack(lm, wrapper)
    try:
        tiny.model(**tiny.image())
    finally:
        undo()
    assert seen and all(h[:2] == m for h, m, _ in seen), "seam 'deepstack': not called per layer with the masks"
    assert "_deepstack_process" not in vars(lm)


def test_loss_function(tiny):
    inputs = tiny.image()
    labels = inputs["input_ids"].clone()
    stock = tiny.model(**inputs, labels=labels).loss
    seen: list = []

    def wrapper(function, **kwargs):
        seen.append(sorted(kwargs))
        return function(**kwargs)

    undo = compat.wrap_loss(tiny.model, wrapper)
    try:
        wrapped = tiny.model(**inputs, labels=labels).loss
    finally:
        undo()
    assert seen and {"logits", "labels", "vocab_size"} <= set(seen[0]), "seam 'loss function'"
    assert torch.equal(wrapped, stock) and "_loss_function" not in vars(tiny.model)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_mask_format(tiny, implementation):
    """tokred's mask for an uncut padded batch is what the model itself gives its layers (on real query rows)."""
    model = tiny.load(attn_implementation=implementation)
    adapter = adapter_for(model)
    inputs = tiny.batch()
    calls: list = []
    hook = record_calls(adapter.layers[0], calls)
    try:
        model(**inputs)
    finally:
        hook.remove()
    stock = calls[0]["attention_mask"]
    if isinstance(stock, dict):  # some layers get one mask per attention type
        stock = stock["full_attention"]
    valid = inputs["attention_mask"].bool()
    ours = compat.attention_mask(valid, valid.shape[1], implementation, torch.float32)
    assert stock.shape == ours.shape and stock.dtype == ours.dtype, "seam 'mask format': shape or dtype"
    rows = valid[:, None, :, None].expand_as(ours)
    assert torch.equal(stock[rows], ours[rows]), "seam 'mask format': values on real rows"


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_decode_mask(tiny, implementation):
    """The mask a layer hands its attention function on a padded batch's decode step allows the keys the 2D mask
    does, and the new token's; flash attention's 2D mask and no mask read as they are."""
    model = tiny.load(attn_implementation=implementation)
    inputs = tiny.batch()
    calls: list = []
    hook = record_calls(adapter_for(model).attention(0), calls)
    try:
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    step = next(kwargs for kwargs in calls if kwargs["hidden_states"].shape[1] == 1)
    want = torch.cat([inputs["attention_mask"].bool(), torch.ones(2, 1, dtype=torch.bool)], dim=1)
    assert not bool(want.all()), "the batch is padded"
    got = compat.decode_key_mask(step["attention_mask"], 2, want.shape[1])
    assert torch.equal(got, want), "seam 'decode mask'"
    assert torch.equal(compat.decode_key_mask(want.long(), 2, want.shape[1]), want)
    assert compat.decode_key_mask(None, 2, want.shape[1]) is None
    with pytest.raises(compat.SeamError, match="'decode mask'.*covers 5 keys, the layer holds 6"):
        compat.decode_key_mask(want[:, :5], 2, 6)


def test_attention_output(tiny):
    """What tokred's fused attention returns for a decode step is laid out as the model's own sdpa function's."""
    attention = adapter_for(tiny.model).attention(0)
    config = tiny.model.config.get_text_config()
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, heads, 1, dim, generator=g)
    key, value = torch.randn(2, 2, kv_heads, 5, dim, generator=g).unbind(0)
    stock, _ = compat.attention_kernel(attention, "sdpa")(attention, query, key, value, None, scaling=0.25)
    exact = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=0.25, enable_gqa=True)
    ours, weights = compat.attention_output(exact)
    assert weights is None and ours.shape == stock.shape == (2, 1, heads, dim), "seam 'attention output'"
    torch.testing.assert_close(ours, stock)
