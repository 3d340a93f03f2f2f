"""patch() on every family's tiny checkpoint: identity when idle, exact unpatch, real shortening,
FastV against an eager-attention reference, pruning equal to masking, no state between calls."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REDUCERS, noise_image, serve

import tokred
from tokred import Config, FastV, Random, compat

IDLE = {
    "keep=1.0": Config(prune=[Random(keep=1.0), FastV(layer=1, keep=1.0)]),
    # not idle by config: both stages run, choose every token, and must leave the call untouched
    "keep_tokens=all": Config(prune=[Random(keep_tokens=10_000), FastV(layer=1, keep_tokens=10_000)]),
}


def run(model, inputs, new_tokens: int = 5):
    """Logits of a plain forward and greedy generated ids."""
    logits = model(**inputs).logits
    ids = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return logits, ids


def budget(n: int, keep: float) -> int:
    return max(1, int(keep * n + 0.5))


@pytest.mark.parametrize("kind", ["image", "batch"])
@pytest.mark.parametrize("idle", list(IDLE))
def test_idle_patch_is_bit_identical(tiny, kind, idle):
    inputs = tiny.inputs(kind)
    logits, ids = run(tiny.model, inputs)
    with tokred.patched(tiny.model, IDLE[idle]):
        patched_logits, patched_ids = run(tiny.model, inputs)
        counts = tokred.stats(tiny.model).vision_tokens
        assert all(c == counts["input"] for c in counts.values()) and sum(counts["input"]) > 0
    assert torch.equal(logits, patched_logits)
    assert torch.equal(ids, patched_ids)


@pytest.mark.parametrize("idle", list(IDLE))
def test_idle_patch_is_bit_identical_on_video(tiny_video, idle):
    inputs = tiny_video.video()
    logits, ids = run(tiny_video.model, inputs)
    with tokred.patched(tiny_video.model, IDLE[idle]):
        patched_logits, patched_ids = run(tiny_video.model, inputs)
    assert torch.equal(logits, patched_logits)
    assert torch.equal(ids, patched_ids)


def test_unpatch_restores_and_repatch_repeats(tiny):
    model, inputs = tiny.model, tiny.batch()

    def hooks_and_forwards():
        return {
            name: (m.forward, dict(m._forward_pre_hooks), dict(m._forward_hooks), sorted(vars(m)))
            for name, m in model.named_modules()
        }

    stock = hooks_and_forwards()
    stock_logits, stock_ids = run(model, inputs)

    tokred.patch(model, "fastv-25")
    first_logits, first_ids = run(model, inputs)
    assert first_logits.shape[1] < stock_logits.shape[1]
    tokred.patch(model, "random-50")  # replaces the previous patch
    assert tokred.stats(model).vision_tokens == {}  # nothing ran yet under the new patch
    tokred.unpatch(model)

    assert not hasattr(model, "_tokred_session")
    assert hooks_and_forwards() == stock
    for name, module in model.named_modules():
        if name.endswith("self_attn") and "language_model" in name:
            assert module.config is model.model.language_model.config, name
    logits, ids = run(model, inputs)
    assert torch.equal(logits, stock_logits) and torch.equal(ids, stock_ids)

    with tokred.patched(model, "fastv-25"):
        again_logits, again_ids = run(model, inputs)
    assert torch.equal(again_logits, first_logits) and torch.equal(again_ids, first_ids)


@pytest.mark.parametrize("method", list(REDUCERS.values()), ids=list(REDUCERS))
def test_quarter_keep_counts_and_shrinks_the_llm(tiny, method):
    serve(tiny, method)
    model, inputs = tiny.model, tiny.batch()
    lengths: dict[int, int] = {}

    def record(index):
        def hook(module, args, output):  # the length each layer actually computed on
            hidden = output[0] if isinstance(output, tuple) else output
            lengths.setdefault(index, hidden.shape[1])

        return hook

    hooks = [layer.register_forward_hook(record(i)) for i, layer in enumerate(model.model.language_model.layers)]
    try:
        with tokred.patched(model, method):
            model(**inputs)
            stats = tokred.stats(model)
            ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert ids.shape == (2, inputs["input_ids"].shape[1] + 4)

    # exact counts: each image keeps floor(n/4 + 1/2) of its n tokens
    image_id = model.config.image_token_id
    n = (inputs["input_ids"] == image_id).sum(1).tolist()
    assert stats.vision_tokens["input"] == n
    assert stats.vision_tokens[method.stage] == [budget(x, 0.25) for x in n]
    for b, kept in enumerate(stats.kept_positions[method.stage]):
        assert bool((inputs["input_ids"][b, kept] == image_id).all())

    full = inputs["input_ids"].shape[1]
    real = inputs["attention_mask"].sum(1)

    def widest(stage: str) -> int:  # the batch's width after a cut: no padding left
        return int((real - torch.tensor(n) + torch.tensor(stats.vision_tokens[stage])).max())

    if method.stage in ("encoder", "pre_llm"):  # cut before the LLM: every layer sees the cut
        assert set(lengths.values()) == {widest(method.stage)}
        assert stats.seq_len == {0: (real - torch.tensor(n) + torch.tensor(stats.vision_tokens[method.stage])).tolist()}
    else:  # layers up to the first cut see everything, those after each cut its width
        cuts = method.cuts(len(lengths))
        names = [f"llm@{k}" for k in cuts[:-1]] + ["llm"]
        ends = [*cuts[1:], len(lengths) - 1]
        assert [lengths[i] for i in range(cuts[0] + 1)] == [full] * (cuts[0] + 1)
        for name, start, end in zip(names, cuts, ends, strict=True):
            assert {lengths[i] for i in range(start + 1, end + 1)} == {widest(name)}, name
        assert sorted(stats.seq_len) == [0, *(k + 1 for k in cuts)]


def _reference_topk(tiny, inputs, layer: int, keep: float) -> list[torch.Tensor]:
    """FastV by brute force: eager attention weights of the stock model, last real query row, head mean."""
    eager = tiny.load(attn_implementation="eager")
    attentions = eager(**inputs, output_attentions=True).attentions[layer]  # (B, H, N, N)
    image_id = eager.config.image_token_id
    kept = []
    for b in range(attentions.shape[0]):
        scores = attentions[b, :, -1].mean(0)  # left padding: the last row is every sample's last token
        positions = (inputs["input_ids"][b] == image_id).nonzero()[:, 0]
        top = scores[positions].topk(budget(len(positions), keep)).indices
        kept.append(positions[top].sort().values)
    return kept


@pytest.mark.parametrize("layer", [0, 2])
def test_fastv_keeps_what_eager_attention_ranks_highest(tiny, layer):
    inputs = tiny.batch()
    with tokred.patched(tiny.model, FastV(layer=layer, keep=0.25)):
        tiny.model(**inputs)
        kept = tokred.stats(tiny.model).kept_positions["llm"]
    reference = _reference_topk(tiny, inputs, layer, 0.25)
    assert [k.tolist() for k in kept] == [r.tolist() for r in reference]


def test_pdrop_cuts_again_by_the_attention_of_the_pruned_model(tiny):
    """PyramidDrop's first cut is FastV's at the same layer and count (eager reference above); its second keeps
    the vision tokens that eager attention at the second layer, in the model FastV pruned, ranks highest."""
    inputs, (first, second) = tiny.image(), (0, 2)
    method = tokred.PyramidDrop(layers=(first, second), keep=0.25)
    with tokred.patched(tiny.model, method):
        tiny.model(**inputs)
        stats = tokred.stats(tiny.model)
    n = stats.vision_tokens["input"][0]
    middle = math.floor(n * 0.5 + 0.5)  # the geometric series: sqrt(0.25) of the tokens, then 0.25
    assert stats.vision_tokens == {"input": [n], f"llm@{first}": [middle], "llm": [budget(n, 0.25)]}
    assert sorted(stats.seq_len) == [0, first + 1, second + 1]
    eager = tiny.load(attn_implementation="eager")
    with tokred.patched(eager, FastV(layer=first, keep_tokens=middle)):
        attentions = eager(**inputs, output_attentions=True).attentions[second]  # (1, H, M, M) after the cut
        survivors = tokred.stats(eager).kept_positions["llm"][0]
    assert survivors.tolist() == stats.kept_positions[f"llm@{first}"][0].tolist()
    image = inputs["input_ids"][0] == tiny.model.config.image_token_id
    sequence = torch.cat([(~image).nonzero()[:, 0], survivors]).sort().values  # input position of each row
    rows = torch.isin(sequence, survivors).nonzero()[:, 0]
    scores = attentions[0, :, -1].mean(0)[rows]
    expected = sequence[rows[scores.topk(budget(n, 0.25)).indices]].sort().values
    assert stats.kept_positions["llm"][0].tolist() == expected.tolist()
    with tokred.patched(tiny.model, tokred.PyramidDrop()):  # the default: four stages of the 4-layer LLM
        tiny.model(**inputs)
        counts = tokred.stats(tiny.model).vision_tokens
    assert counts == {"input": [n], "llm@0": [n // 2], "llm@1": [n // 4], "llm": [budget(n, 0.125)]}


def _layer_input(model, layer: int, inputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The hidden states LLM layer `layer` receives in a stock forward (after any deepstack additions), and
    every layer's attention weights (the model must run eager attention)."""
    from tokred.adapters import adapter_for

    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs.get("hidden_states", args[0] if args else None))

    handle = adapter_for(model).layers[layer].register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        handle.remove()
    return seen[0], out.attentions


def test_sparsevlm_keeps_what_the_raters_attention_ranks_highest(tiny):
    """SparseVLM by hand on the stock eager model: raters are the text tokens after the image whose relevance
    (softmax over the text of the image tokens' dot products with them, mean over the image) is above the mean;
    the kept tokens are those the raters' head-mean attention at layer K ranks highest."""
    inputs, layer = tiny.batch(), 1
    method = tokred.SparseVLM(layers=(layer,), keep=0.25)
    with tokred.patched(tiny.model, method):
        tiny.model(**inputs)
        kept = tokred.stats(tiny.model).kept_positions["llm"]
    hidden, attentions = _layer_input(tiny.load(attn_implementation="eager"), layer + 1, inputs)
    image_id = tiny.model.config.image_token_id
    for b in range(len(kept)):
        ids, valid = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        image = (ids == image_id).nonzero()[:, 0]
        after = ((ids != image_id) & valid & (torch.arange(len(ids)) > image.max())).nonzero()[:, 0]
        relevance = (hidden[b, image] @ hidden[b, after].T).softmax(-1).mean(0)
        rows = attentions[layer][b, :, after[relevance > relevance.mean()]].mean(0)  # (raters, N), head mean
        scores = rows[:, image].mean(0)
        expected = image[scores.topk(budget(len(image), 0.25)).indices].sort().values
        assert kept[b].tolist() == expected.tolist(), b


def _tome_by_hand(blocks, hidden: torch.Tensor, last: int, k: int, skip: int):
    """ToMe between the stock blocks of a CLIP/SigLIP tower up to block `last`: after each block before it,
    merge by that block's keys (k_proj of its normed input, head mean) down by an even share of what must go
    to `k` (+ `skip` leading [CLS] tokens, kept out of merges) over the merge points left, the later blocks
    given log(size) as attention bias. Returns the last block's output and keys, sizes, each input token's
    slot, each slot's input token, and the length each block ran on."""
    from tokred.methods.tome import merge_down

    sizes = torch.ones(hidden.shape[:2])
    into = origin = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
    lengths, bias = [], None
    for j, block in enumerate(blocks[: last + 1]):
        keys = block.self_attn.k_proj(block.layer_norm1(hidden))
        keys = keys.view(*hidden.shape[:2], -1, block.self_attn.head_dim).mean(2)
        lengths.append(hidden.shape[1])
        hidden = block(hidden, bias)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if j < last:
            target = hidden.shape[1] - (hidden.shape[1] - (k + skip)) // (last - j + 1)
            hidden, sizes, step, survivors = merge_down(hidden, keys, sizes, target, protect_first=bool(skip))
            into, origin = step.gather(1, into), origin.gather(1, survivors)
            bias = sizes.log()[:, None, None, :]
    return hidden, keys, sizes, into, origin, lengths


def test_tome_merges_inside_the_tower_as_written_out():
    """ToMe in LLaVA's CLIP tower (the shipped checkpoint: four blocks, features from the third, so two merge
    points inside), by hand on the stock modules: after each block up to the one the projector reads, merge by
    that block's keys (k_proj of its normed input, head mean) to the schedule, the later blocks given log(size)
    as attention bias; the rest merged at the tower's output; each group's row at its surviving token's place."""
    from tokred.adapters import adapter_for
    from tokred.eval import questions
    from tokred.methods.tome import merge_down
    from tokred.zoo import load
    from tokred.zoo.prompts import chat, media_inputs

    model, processor = load("shapes-llava")
    batch = questions("shapes", 2)
    texts = [chat(processor, "shapes", q.record["question"]) for q in batch]
    inputs, method = media_inputs(processor, "shapes", texts, [q.media for q in batch]), tokred.ToMe(keep=0.25)
    adapter = adapter_for(model)
    seen, lengths = {}, []

    def llm_input(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    hooks = [adapter.language_model.register_forward_pre_hook(llm_input, with_kwargs=True)]  # before tokred's

    def computed(module, args, out):  # the length a block ran on
        lengths.append((out[0] if isinstance(out, tuple) else out).shape[1])

    hooks += [block.register_forward_hook(computed) for block in adapter.vision_blocks]
    try:
        with tokred.patched(model, method):
            model(**inputs)
            stats = tokred.stats(model)
    finally:
        for hook in hooks:
            hook.remove()

    tower, last = adapter.vision_tower, adapter.feature_block()
    stem = getattr(tower, "vision_model", tower)  # transformers before 5.24 nests the ViT one level down
    hidden = stem.pre_layrnorm(stem.embeddings(inputs["pixel_values"]))
    n = hidden.shape[1] - 1  # the LLM's tokens per image: [CLS] is dropped
    k = method.budget(n)
    hidden, keys, sizes, into, origin, expected_lengths = _tome_by_hand(adapter.vision_blocks, hidden, last, k, 1)
    merged, _, step, survivors = merge_down(hidden[:, 1:], keys[:, 1:], sizes[:, 1:], k)
    groups, kept = step.gather(1, into[:, 1:] - 1), (origin[:, 1:] - 1).gather(1, survivors)
    features = model.model.multi_modal_projector(merged)  # one row per group
    assert lengths[: last + 1] == expected_lengths == [65, 49, 33] and lengths[last + 1] == hidden.shape[1]
    image = model.config.image_token_id
    for b in range(len(kept)):
        positions = (inputs["input_ids"][b] == image).nonzero()[:, 0]
        assert stats.kept_positions["encoder"][b].tolist() == positions[kept[b]].tolist()
        members = [positions[groups[b] == g].tolist() for g in range(k)]
        assert [g.tolist() for g in stats.merged_groups["encoder"][b]] == [m for m in members if len(m) > 1]
        # the model's own scatter put each group's row at every member's place (tokred then keeps one)
        torch.testing.assert_close(seen["embeds"][b, positions], features[b, groups[b]], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tiny", ["llava_onevision"], indirect=True)
def test_tome_merges_inside_onevision_siglip_and_restores_its_rows(tiny):
    """LLaVA-OneVision's SigLIP merges between blocks as CLIP does (its blocks after the first run on fewer
    tokens), then every token gets its group's row back at the projector's input, so the model's own packing
    runs on the whole grid; the LLM's tokens are then merged to the budget of each image."""
    from tokred.adapters import adapter_for
    from tokred.methods.tome import merge_down

    inputs, method, adapter = tiny.batch(), tokred.ToMe(keep=0.25), adapter_for(tiny.model)
    seen: dict[str, torch.Tensor] = {}

    def tower_input(module, args, kwargs):
        seen.setdefault("hidden", kwargs.get("hidden_states", args[0] if args else None))

    def projector_input(module, args, out):  # after tokred's pre-hook: what the projector ran on
        seen["features"] = args[0]

    def computed(module, args, out):  # the length a block ran on
        ran.append((out[0] if isinstance(out, tuple) else out).shape[1])

    ran: list[int] = []
    hooks = [adapter.vision_blocks[0].register_forward_pre_hook(tower_input, with_kwargs=True)]
    hooks.append(adapter.projector.register_forward_hook(projector_input))
    hooks += [block.register_forward_hook(computed) for block in adapter.vision_blocks]
    try:
        with tokred.patched(tiny.model, method):
            tiny.model(**inputs)
            kept = tokred.stats(tiny.model).kept_positions["encoder"]
    finally:
        for hook in hooks:
            hook.remove()

    n, k = seen["hidden"].shape[1], method.budget(seen["hidden"].shape[1])
    hidden, keys, sizes, into, _, lengths = _tome_by_hand(
        adapter.vision_blocks, seen["hidden"], adapter.feature_block(), k, 0
    )
    assert ran == lengths == [n, n - (n - k) // 2]
    merged, _, step, _ = merge_down(hidden, keys, sizes, k)
    rows = merged.gather(1, step.gather(1, into)[..., None].expand(-1, -1, merged.shape[-1]))
    torch.testing.assert_close(seen["features"], rows, rtol=1e-4, atol=1e-5)
    image = tiny.model.config.image_token_id
    placeholders = (inputs["input_ids"] == image).sum(1).tolist()
    assert [len(k) for k in kept] == [method.budget(p) for p in placeholders]


def _stock_positions(model, inputs) -> torch.Tensor:
    """The position ids the stock model hands its LLM for these inputs."""
    seen = {}

    def record(module, args, kwargs):
        seen["pos"] = kwargs.get("position_ids")

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        hook.remove()
    pos = seen["pos"]
    if pos is None:
        pos = torch.arange(inputs["input_ids"].shape[1])[None]
    return pos


@pytest.mark.parametrize("preset", ["random-25", "random-50"])
def test_pruning_equals_masking_through_decoding(tiny, preset):
    """Dropping tokens before the LLM must equal the stock model with those tokens masked out as keys,
    at the same positions, for the prefill and every decode step of generate()."""
    _assert_pruning_equals_masking(tiny.model, tiny.image(), preset, tiny.model.config.image_token_id)


def test_video_pruning_equals_masking_through_decoding(tiny_video):
    model = tiny_video.model
    _assert_pruning_equals_masking(model, tiny_video.video(), "random-25", model.config.video_token_id)


@pytest.mark.parametrize("method", list(REDUCERS.values()), ids=list(REDUCERS))
def test_video_keeps_a_quarter_of_its_tokens(tiny_video, method):
    serve(tiny_video, method)
    model, inputs = tiny_video.model, tiny_video.video()
    with tokred.patched(model, method):
        ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        stats = tokred.stats(model)
    n = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert stats.vision_tokens["input"] == [n] and stats.vision_tokens[method.stage] == [budget(n, 0.25)]
    assert list(stats.vision_tokens)[-1] == method.stage
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 4


def _assert_pruning_equals_masking(model, inputs, preset: str, token_id: int) -> None:
    steps = 4
    with tokred.patched(model, preset):
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        kept = tokred.stats(model).kept_positions["pre_llm"][0]
    dropped = (inputs["input_ids"][0] == token_id).nonzero()[:, 0]
    dropped = dropped[~torch.isin(dropped, kept)]
    assert len(dropped) > 0

    positions = _stock_positions(model, inputs)
    mask = inputs["attention_mask"].clone()
    mask[0, dropped] = 0
    reference = model(**{**inputs, "attention_mask": mask}, position_ids=positions, use_cache=True)
    cache, ids = compat.output_cache(reference), out.sequences[:, inputs["input_ids"].shape[1] :]
    for step in range(steps):
        assert torch.allclose(out.logits[step], reference.logits[:, -1], atol=1e-4), step
        assert int(reference.logits[0, -1].argmax()) == int(ids[0, step])
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        reference = model(
            input_ids=ids[:, step : step + 1],
            attention_mask=mask,
            position_ids=positions[..., -1:] + step + 1,
            use_cache=True,
            **{compat.cache_argument(model): cache},
        )
        cache = compat.output_cache(reference)


def test_calls_do_not_leak_state(tiny):
    model = tiny.model
    first, second = tiny.image(seed=3), tiny.batch()
    with tokred.patched(model, Config(prune=[Random(keep=0.5), FastV(layer=1, keep=0.5)])):
        a1 = model.generate(**first, max_new_tokens=4, do_sample=False)
        stats_first = tokred.stats(model).vision_tokens
        model.generate(**second, max_new_tokens=4, do_sample=False)
        images = (second["input_ids"] == model.config.image_token_id).sum(1).tolist()
        assert tokred.stats(model).vision_tokens["input"] == images
        a2 = model.generate(**first, max_new_tokens=4, do_sample=False)
        assert tokred.stats(model).vision_tokens == stats_first
        # a text-only call in between must not reuse the last image's cut
        text = tiny.processor(text=[tiny.prompt(text="hello there")], return_tensors="pt")
        model.generate(**text, max_new_tokens=2, do_sample=False)
        assert "llm" not in tokred.stats(model).vision_tokens
    assert torch.equal(a1, a2)


def test_multi_turn_conversation(tiny):
    chat = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is red?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a star"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and in this one?"}]},
    ]
    text = tiny.processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = tiny.processor(images=[noise_image(7), noise_image(8)], text=[text], return_tensors="pt")
    with tokred.patched(tiny.model, "fastv-25"):
        ids = tiny.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        stats = tokred.stats(tiny.model)
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 4
    assert stats.vision_tokens["input"][0] == int((inputs["input_ids"] == tiny.model.config.image_token_id).sum())
    assert stats.vision_tokens["llm"][0] < stats.vision_tokens["input"][0]


def test_stats_give_each_medium_its_token_grid(tiny):
    inputs = tiny.batch()
    with tokred.patched(tiny.model, "none"):
        tiny.model(**inputs)
        stats = tokred.stats(tiny.model)
    assert [[kind for kind, _ in sample] for sample in stats.media] == [["image"], ["image"]]
    grids = [sample[0][1] for sample in stats.media]
    if "image_grid_thw" in inputs:  # Qwen: the processor's patch grid, merged 2 x 2
        assert grids == [(t, h // 2, w // 2) for t, h, w in inputs["image_grid_thw"].tolist()]
    for grid, n in zip(grids, stats.vision_tokens["input"], strict=True):
        assert grid is None or math.prod(grid) == n
    assert any(grid is not None for grid in grids) or tiny.family == "llava_onevision"


def test_random_draws_differ_between_samples_and_seeds(tiny):
    inputs = tiny.image()
    kept = {}
    for seed in (0, 1):
        with tokred.patched(tiny.model, Random(keep=0.5, seed=seed)):
            tiny.model(**inputs)
            kept[seed] = tokred.stats(tiny.model).kept_positions["pre_llm"][0].tolist()
    assert kept[0] != kept[1]


@pytest.mark.parametrize("preset", ["fastv-25", "random-25", "pdrop:keep=0.25:layers=0/2"])
def test_generate_without_cache_selects_once_per_prompt(tiny, preset):
    """use_cache=False recomputes the whole sequence each step; the prompt's selection is kept, so the tokens
    equal those of use_cache=True."""
    from tokred.adapters import adapter_for

    inputs = tiny.batch()
    steps = 8
    # random weights may emit a placeholder token, which a whole-sequence recompute would read as a new image
    greedy = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    greedy["suppress_tokens"] = list(adapter_for(tiny.model).token_ids().values())
    with tokred.patched(tiny.model, preset):
        cached = tiny.model.generate(**inputs, **greedy)
        kept = tokred.stats(tiny.model).kept_positions
        uncached = tiny.model.generate(**inputs, **greedy, use_cache=False)
        assert tokred.stats(tiny.model).kept_positions.keys() == kept.keys()
        for stage, positions in kept.items():
            assert [p.tolist() for p in tokred.stats(tiny.model).kept_positions[stage]] == [
                p.tolist() for p in positions
            ], stage
    assert torch.equal(cached, uncached)


def test_labels_are_cut_with_the_tokens(tiny):
    """Loss with pruning = the stock model's loss with the dropped tokens masked out (pruning equals masking),
    labels on the prompt's last text tokens."""
    model, inputs = tiny.model, tiny.image()
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -4:] = inputs["input_ids"][:, -4:]
    with tokred.patched(model, "random-50"):
        out = model(**inputs, labels=labels)
        kept = tokred.stats(model).kept_positions["pre_llm"][0]
    assert out.logits.shape[1] < labels.shape[1]
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]
    mask = inputs["attention_mask"].clone()
    mask[0, image[~torch.isin(image, kept)]] = 0
    reference = model(**{**inputs, "attention_mask": mask}, position_ids=_stock_positions(model, inputs), labels=labels)
    assert torch.allclose(out.loss, reference.loss, atol=1e-5)
    with tokred.patched(model, "fastv-25"):  # inside the LLM too: each kept position predicts its own next token
        fastv = model(**inputs, labels=labels)
        vision = tokred.stats(model).kept_positions["llm"][0]
    text = (inputs["input_ids"][0] != model.config.image_token_id).nonzero()[:, 0]
    positions = torch.cat([text, vision]).sort().values
    shifted = torch.nn.functional.pad(labels[0], (0, 1), value=-100)[1:]
    assert fastv.logits.shape[1] == len(positions)
    assert torch.allclose(fastv.loss, torch.nn.functional.cross_entropy(fastv.logits[0], shifted[positions]))


def test_fastv_auto_keeps_the_fewest_tokens_holding_the_attention_mass(tiny):
    """keep="auto": per sample, the smallest top set of eager attention (last query, head mean) whose share of
    the image's attention reaches `mass`, within the bounds."""
    inputs, layer = tiny.batch(), 1
    attentions = tiny.load(attn_implementation="eager")(**inputs, output_attentions=True).attentions[layer]
    image_id = tiny.model.config.image_token_id
    for mass, low, high in ((0.5, 0.05, 1.0), (0.9, 0.05, 0.3)):
        with tokred.patched(tiny.model, FastV(layer=layer, keep="auto", mass=mass, keep_min=low, keep_max=high)):
            tiny.model(**inputs)
            kept = tokred.stats(tiny.model).kept_positions["llm"]
        for b in range(len(kept)):
            positions = (inputs["input_ids"][b] == image_id).nonzero()[:, 0]
            scores = attentions[b, :, -1].mean(0)[positions]
            share = scores.sort(descending=True).values.cumsum(0) / scores.sum()
            k = min(max(int((share < mass).sum()) + 1, budget(len(positions), low)), budget(len(positions), high))
            assert kept[b].tolist() == positions[scores.topk(k).indices].sort().values.tolist(), (mass, b)


def test_dart_keeps_what_the_stock_models_keys_and_hidden_states_say(tiny):
    """DART by hand on the stock model: pivots by the L2 norm of layer K's keys (k_proj, after k_norm where the
    family has one: rotary embeddings keep the norm), then the tokens least similar to them in the hidden
    states layer K+1 receives."""
    from tokred.adapters import adapter_for
    from tokred.methods.dart import least_duplicated

    inputs, layer, method = tiny.batch(), 1, tokred.DART(layer=1, keep=0.25, pivots=2)
    adapter, seen = adapter_for(tiny.model), {}
    attention = adapter.attention(layer)
    keys = getattr(attention, "k_norm", None) or attention.k_proj

    def hidden(module, args, kwargs):
        seen.setdefault("hidden", kwargs.get("hidden_states", args[0] if args else None))

    def key(module, args, out):
        seen.setdefault("keys", out)

    handles = [
        keys.register_forward_hook(key),
        adapter.layers[layer + 1].register_forward_pre_hook(hidden, with_kwargs=True),
    ]
    try:
        tiny.model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    norms = seen["keys"].flatten(2).square().sum(-1).sqrt()  # (B, N): every head's key of a position
    with tokred.patched(tiny.model, method):
        tiny.model(**inputs)
        kept = tokred.stats(tiny.model).kept_positions["llm"]
    image_id = tiny.model.config.image_token_id
    for b in range(len(kept)):
        positions = (inputs["input_ids"][b] == image_id).nonzero()[:, 0]
        k = method.budget(len(positions))
        pivots = norms[b, positions].topk(2).indices
        expected = positions[least_duplicated(seen["hidden"][b, positions], pivots, k)]
        assert kept[b].tolist() == expected.tolist(), b


def test_mustdrop_keeps_what_eager_attention_and_the_hidden_states_say(tiny):
    """MustDrop by hand on the stock eager model: 2x2 windows of the token grid whose mean pairwise cosine (hidden
    states after layer K) clears the threshold offer their last token only; the rest ranks by the text after the
    image, alternately by summed and by largest single attention (head mean) at layer K."""
    inputs, layer = tiny.batch(), 1
    method = tokred.MustDrop(layer=layer, keep=0.25, threshold=0.5)
    with tokred.patched(tiny.model, method):
        tiny.model(**inputs)
        stats = tokred.stats(tiny.model)
    hidden, attentions = _layer_input(tiny.load(attn_implementation="eager"), layer + 1, inputs)
    image_id = tiny.model.config.image_token_id
    for b, kept in enumerate(stats.kept_positions["llm"]):
        ids, valid = inputs["input_ids"][b], inputs["attention_mask"][b].bool()
        image = (ids == image_id).nonzero()[:, 0]
        after = ((ids != image_id) & valid & (torch.arange(len(ids)) > image.max())).nonzero()[:, 0]
        rows = attentions[layer][b, :, after][:, :, image].mean(0)  # (text after, image)
        by_sum, by_max = rows.sum(0).argsort(descending=True).tolist(), rows.amax(0).argsort(descending=True).tolist()
        order = list(dict.fromkeys(t for pair in zip(by_sum, by_max, strict=True) for t in pair))
        folded = set()
        grid = stats.media[b][0][1]
        if grid is not None:
            _, h, w = grid
            unit = torch.nn.functional.normalize(hidden[b, image], dim=-1)
            for y in range(0, h - h % 2, 2):
                for x in range(0, w - w % 2, 2):
                    cells = [y * w + x, y * w + x + 1, (y + 1) * w + x, (y + 1) * w + x + 1]
                    if (unit[cells] @ unit[cells].T).sum().sub(4).div(12) >= 0.5:
                        folded |= set(cells[:3])
        ranked = [t for t in order if t not in folded] + [t for t in order if t in folded]
        expected = image[sorted(ranked[: budget(len(image), 0.25)])]
        assert kept.tolist() == expected.tolist(), b


@pytest.mark.parametrize("tiny", ["llava"], indirect=True)
def test_visionzip_ranks_by_the_cls_attention_eager_attention_reports(tiny):
    """VisionZip by hand on LLaVA: the [CLS] row (head mean) of the tower's eager attention at the feature
    layer ranks the dominant tokens; the contextual ones follow from the projected tokens."""
    from tokred.adapters import adapter_for
    from tokred.methods.visionzip import zip_tokens

    inputs, method = tiny.batch(), tokred.VisionZip(keep=0.25)
    adapter = adapter_for(tiny.model)
    eager = tiny.load(attn_implementation="eager")
    tower = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    cls = tower.attentions[adapter.encoder_attention_block()][:, :, 0, 1:].mean(1)  # (images, patches)
    seen = {}

    def embeds(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = adapter.language_model.register_forward_pre_hook(embeds, with_kwargs=True)
    try:
        tiny.model(**inputs)
    finally:
        handle.remove()
    with tokred.patched(tiny.model, method):
        tiny.model(**inputs)
        kept = tokred.stats(tiny.model).kept_positions["pre_llm"]
    for b in range(len(kept)):
        positions = (inputs["input_ids"][b] == tiny.model.config.image_token_id).nonzero()[:, 0]
        k = method.budget(len(positions))
        dominant = min(k - 1, max(1, round(method.dominant * k)))
        merge = zip_tokens(seen["embeds"][b, positions], cls[b], dominant, k - dominant)
        assert kept[b].tolist() == positions[merge.index].tolist(), b


def _tower_signal(tiny, inputs: dict, monkeypatch) -> tuple[torch.Tensor, object, list[torch.Tensor]]:
    """The encoder signal VisPruner's prefill got for `inputs`, and an eager copy of the model whose signal block
    appends each call's attention, head and query mean ((sequences, tokens)), to the returned list."""
    import sys

    import tokred.stages.pre_llm as pre_llm
    from tokred.adapters import adapter_for

    seen, stock = {}, pre_llm.choose

    def spy(*args, **kwargs):
        seen["scores"] = kwargs["encoder_scores"]
        return stock(*args, **kwargs)

    monkeypatch.setattr(pre_llm, "choose", spy)
    with tokred.patched(tiny.model, tokred.VisPruner(keep=0.5)):
        tiny.model(**inputs)
    eager = tiny.load(attn_implementation="eager")
    adapter = adapter_for(eager)
    block = adapter.vision_attention(adapter.encoder_attention_block())
    module = sys.modules[type(block).__module__]
    weights, kernel = [], module.eager_attention_forward

    def recording(attention, *args, **kwargs):
        out, probs = kernel(attention, *args, **kwargs)
        if attention is block:
            weights.append(probs.float().mean((1, 2)))
        return out, probs

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    return seen["scores"], eager, weights


@pytest.mark.parametrize("tiny", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"], indirect=True)
def test_qwen_tower_scores_are_the_eager_attention_each_token_receives(tiny, monkeypatch):
    """The encoder signal on Qwen towers by hand: transformers' own eager attention of the signal block (each
    chunk: a window or the whole image), averaged over heads and queries per patch, then over each 2x2 merger
    group, and put back in raster order where the tower works in windows."""
    from tokred.adapters import adapter_for

    inputs = tiny.batch()
    scores, eager, weights = _tower_signal(tiny, inputs, monkeypatch)
    adapter = adapter_for(eager)
    eager.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    patches = torch.cat([w.reshape(-1) for w in weights])
    unit = eager.config.vision_config.spatial_merge_size**2
    groups, at = patches.view(-1, unit).mean(-1), 0
    image_id = tiny.model.config.image_token_id
    for b, grid in enumerate(inputs["image_grid_thw"]):
        count = int(grid.prod()) // unit
        mine = groups[at : at + count]
        if adapter.windowed:
            mine = mine[torch.argsort(compat.window_order(adapter.vision_tower, grid[None]))]
        at += count
        positions = (inputs["input_ids"][b] == image_id).nonzero()[:, 0]
        torch.testing.assert_close(scores[b, positions], mine, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tiny", ["llava_onevision"], indirect=True)
@pytest.mark.parametrize("kind", ["batch", "video"])
def test_onevision_tower_scores_are_the_eager_attention_each_token_receives(tiny, kind, monkeypatch):
    """The encoder signal on LLaVA-OneVision by hand: SigLIP's eager attention at the projector's block, head
    and query mean per tower token, then carried to the LLM tokens the way the features are: for images each
    LLM token takes the score of the tower token whose features it holds (traced by feeding the projector the
    tower tokens' indices; newline tokens score 0), for video each is the mean of its 2x2 pooled tokens."""
    inputs = tiny.inputs(kind)
    scores, eager, weights = _tower_signal(tiny, inputs, monkeypatch)
    token_id = tiny.model.config.video_token_id if kind == "video" else tiny.model.config.image_token_id
    if kind == "video":
        eager.model.get_video_features(inputs["pixel_values_videos"])
        frames = weights[0]
        side = math.isqrt(frames.shape[1])
        pooled = (
            frames.view(-1, side // 2, 2, side // 2, 2).mean((2, 4)).reshape(inputs["pixel_values_videos"].shape[0], -1)
        )
        expected = [torch.cat([v, v.new_zeros(1)]) for v in pooled]
    else:
        extra = {k: inputs[k] for k in ("batch_num_images",) if k in inputs}
        eager.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra)
        views = weights[0].reshape(-1)
        width = eager.config.text_config.hidden_size
        markers = torch.arange(len(views), dtype=torch.float32).view(weights[0].shape)
        monkeypatch.setattr(
            eager.model.multi_modal_projector, "forward", lambda x: markers[..., None].expand(-1, -1, width)
        )
        with torch.no_grad():
            eager.model.image_newline.fill_(-1)
        traced = eager.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], **extra).pooler_output
        expected = [torch.where(t[:, 0] >= 0, views[t[:, 0].clamp(min=0).long()], 0.0) for t in traced]
    for b, expected_scores in enumerate(expected):
        positions = (inputs["input_ids"][b] == token_id).nonzero()[:, 0]
        torch.testing.assert_close(scores[b, positions], expected_scores, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tiny", ["llava", "qwen2_5_vl"], indirect=True)
def test_tower_attention_sizes_auto_budgets(tiny, monkeypatch):
    """keep="auto" on the tower's attention: each sample keeps the fewest tokens holding `mass` of it."""
    import tokred.stages.pre_llm as pre_llm

    inputs, seen, stock = tiny.batch(), {}, pre_llm.choose

    def spy(*args, **kwargs):
        seen["scores"] = kwargs["encoder_scores"]
        return stock(*args, **kwargs)

    monkeypatch.setattr(pre_llm, "choose", spy)
    with tokred.patched(tiny.model, tokred.VisPruner(keep="auto", mass=0.5)):
        tiny.model(**inputs)
        kept = tokred.stats(tiny.model).vision_tokens["pre_llm"]
    image_id = tiny.model.config.image_token_id
    for b, count in enumerate(kept):
        positions = (inputs["input_ids"][b] == image_id).nonzero()[:, 0]
        scores = seen["scores"][b, positions]
        assert torch.all(scores > 0)  # attention received, not the zeros of a missing signal
        share = scores.sort(descending=True).values.cumsum(0) / scores.sum()
        assert count == max(int((share < 0.5).sum()) + 1, budget(len(positions), 0.05)), b
