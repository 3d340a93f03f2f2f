"""The training script's pieces: labels cover exactly the answers, batches are one stream, and the curriculum's
symbols, hooks and parameter split do what its stages need."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import AutoProcessor

from tokred.adapters import adapter_for
from tokred.zoo import build
from tokred.zoo.curriculum import (
    Symbols,
    attention_loss,
    quadrant_seen,
    recorded_attention,
    symbolic_inputs,
    vision_rows,
)
from tokred.zoo.datasets import COLOURS, SHAPES, sample
from tokred.zoo.datasets.cells import owners
from tokred.zoo.datasets.shapes import QUADRANTS, quadrant
from tokred.zoo.prompts import chat
from tokred.zoo.train import (
    Batches,
    answer_queries,
    batch_inputs,
    kept_share,
    stage_loss,
    token_grid,
    trainable,
    turns_for,
)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
@pytest.mark.parametrize("kind", ["shapes", "motion"])
def test_labels_are_the_answer_tokens_of_every_turn(tmp_path, family, kind):
    if family == "llava" and kind == "motion":
        pytest.skip("LLaVA-1.5 takes no video")
    processor = AutoProcessor.from_pretrained(build(family, tmp_path / family))
    rng = np.random.default_rng(0)
    records = [sample(kind, "train", i) for i in (0, 1, 3)]  # scenes with at least 2 other questions
    items = [(turns_for(kind, r, rng, limit), m) for limit, (r, m) in zip((1, 2, 3), records, strict=True)]
    inputs = batch_inputs(processor, kind, items, train=True)
    eos = processor.tokenizer.eos_token
    for b, (turns, _) in enumerate(items):
        target = inputs["labels"][b][inputs["labels"][b] != -100]
        assert processor.tokenizer.decode(target) == "".join(t["answer"] + eos for t in turns)
    assert [len(t) for t, _ in items] == [1, 2, 3]
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


def test_turns_of_chosen_types_only():
    rng, kept = np.random.default_rng(0), 0
    for i in range(30):
        record, _ = sample("shapes", "train", i)
        turns = turns_for("shapes", record, rng, 4, types=("quadrant",))
        if any(t["type"] == "quadrant" for t in turns):
            kept += 1
            assert {t["type"] for t in turns} == {"quadrant"} and len({t["question"] for t in turns}) == len(turns)
            assert (turns[0] is record) == (record["type"] == "quadrant")
        else:  # a scene without a question of the type keeps its own
            assert turns == [record]
    assert kept > 10


def test_token_grid():
    _, frames = sample("motion", "train", 0)
    assert token_grid(128, frames) == (8, 4, 4)
    assert token_grid(256, frames[0]) == (1, 16, 16)
    with pytest.raises(ValueError, match="not 8 square grids"):
        token_grid(100, frames)


def test_batches_are_the_same_stream_for_any_number_of_workers(tmp_path):
    processor = AutoProcessor.from_pretrained(build("qwen2_5_vl", tmp_path / "q", image_size=448))
    ids = [processor.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    batches = Batches(processor, ["shapes", "motion"], 2, 3, seed=0, first=10, vision_ids=ids)
    alone = [batches.batch(step) for step in range(4)]
    loader = DataLoader(batches, batch_size=None, num_workers=2)
    for one, other in zip(alone, loader, strict=False):
        assert one.kind == other.kind and torch.equal(one.inputs["input_ids"], other.inputs["input_ids"])
        assert one.records == other.records and one.grids == other.grids
        assert int((one.inputs["labels"] != -100).sum()) > 0
    assert [b.kind for b in alone] == ["shapes", "motion", "shapes", "motion"]
    assert alone[0].grids == [(1, 8, 8)] * 2 and alone[1].grids == [(8, 8, 8)] * 2 and alone[1].size == 224
    assert [r["id"] for r in alone[2].records] == ["train_000014", "train_000015"]  # media 10 + 2 * step


@pytest.fixture(scope="module")
def tiny_trainee(tmp_path_factory):
    """A model of the training script's layout (small), its processor and one batch."""
    from transformers import AutoModelForImageTextToText

    path = build("qwen2_5_vl", tmp_path_factory.mktemp("t") / "q", image_size=448)
    model = AutoModelForImageTextToText.from_pretrained(path).train()
    processor = AutoProcessor.from_pretrained(path)
    ids = list(adapter_for(model).token_ids().values())
    return model, processor, Batches(processor, ["shapes"], 2, 2, seed=0, first=0, vision_ids=ids).batch(0)


@pytest.mark.parametrize("with_quadrant", [True, False])
def test_symbols_sum_the_colour_shape_and_quadrant_of_the_object_in_each_cell(tiny_trainee, with_quadrant):
    model, _, batch = tiny_trainee
    symbols = Symbols(model.config.get_text_config().hidden_size, with_quadrant)
    record, grid = batch.records[0], batch.grids[0]
    rows, owner = symbols.rows(record, grid, batch.size), owners(record, grid, batch.size)
    assert rows.shape == (64, symbols.background.numel())
    assert (rows[torch.from_numpy(owner < 0)] == symbols.background).all() and (owner >= 0).sum() > 0
    for token in (owner >= 0).nonzero()[0]:
        o = record["objects"][owner[token]]
        expected = (
            symbols.colour.weight[list(COLOURS).index(o["colour"])]
            + symbols.shape.weight[SHAPES.index(o["shape"])]
            + symbols.quadrant.weight[QUADRANTS.index(quadrant(o["cx"], o["cy"], batch.size))] * with_quadrant
        )
        torch.testing.assert_close(rows[token], expected)
    assert quadrant(10, 200, 224) == "bottomleft" and quadrant(120, 20, 224) == "topright"
    assert [quadrant_seen(f) for f in ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")] == [
        True,
        True,
        False,
        False,
        True,
    ]


def test_the_align_loss_weighs_each_factor_alike():
    """Rows that keep colour and shape but drop a quadrant vector a third as long as the others are off by
    under a tenth overall, and by a whole unit on the quadrant's own term; exact rows cost nothing."""
    torch.manual_seed(0)
    symbols = Symbols(128)
    with torch.no_grad():
        for table, norm in ((symbols.colour, 0.9), (symbols.shape, 0.9), (symbols.quadrant, 0.3)):
            table.weight.copy_(norm * F.normalize(torch.randn_like(table.weight), dim=-1))
    n = 256
    parts = [table.weight[torch.randint(table.num_embeddings, (n,))] for table in (symbols.colour, symbols.shape)]
    quadrants = symbols.quadrant.weight[torch.randint(len(QUADRANTS), (n,))]
    target = (parts[0] + parts[1] + quadrants).detach()
    dropped = target - quadrants.detach()
    overall = F.mse_loss(dropped, target) / target.pow(2).mean()
    assert overall < 0.1
    assert symbols.align_loss(dropped, target) >= overall + 1 - 1e-4
    assert symbols.align_loss(target, target) == 0


def test_the_attention_loss_agrees_with_eager_attention_weights(tiny_trainee, tmp_path):
    """The loss reads head 0's attention from the token before each answer; eager attention's own weights give
    the same masses."""
    from transformers import AutoModelForImageTextToText

    model, processor, batch = tiny_trainee
    path = tmp_path / "eager"
    model.save_pretrained(path)
    eager = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager").eval()
    adapter = adapter_for(eager)
    queries = answer_queries(adapter, batch)
    assert len(queries) >= 2 and all(batch.inputs["labels"][b, p] == -100 for b, p, _ in queries)
    assert all(batch.inputs["labels"][b, p + 1] != -100 for b, p, _ in queries)  # the first answer token is next
    image = batch.inputs["input_ids"] == eager.config.image_token_id
    assert all(image[b, t].all() for b, _, t in queries)
    with torch.no_grad(), recorded_attention(adapter, [2, 3]) as records:
        out = eager(**batch.inputs, output_attentions=True)
        loss = attention_loss(records, queries, batch.inputs["attention_mask"])
    expected = [-torch.log(out.attentions[layer][b, 0, p, t].sum() + 1e-6) for layer in (2, 3) for b, p, t in queries]
    torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-4, atol=1e-5)


def test_the_symbolic_stage_feeds_the_llm_symbols_and_trains_only_its_side(tiny_trainee):
    model, processor, batch = tiny_trainee
    adapter = adapter_for(model)
    symbols = Symbols(model.config.get_text_config().hidden_size)
    rows = symbols.batch(batch.records, batch.grids, batch.size)
    seen, tower = [], []
    handles = [
        adapter.layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True,
        ),
        adapter.vision_tower.register_forward_pre_hook(lambda *a: tower.append(1)),
    ]
    try:
        with symbolic_inputs(adapter, lambda: rows):
            model(**batch.inputs)
        assert not tower  # the symbols stand in for the tower's features: it never runs
        model(**batch.inputs)
        assert tower  # and after the block it does again
    finally:
        for handle in handles:
            handle.remove()
    vision = batch.inputs["input_ids"] == model.config.image_token_id
    torch.testing.assert_close(seen[0][vision], rows)
    vision_params = {id(p) for m in (adapter.vision_tower, adapter.projector) for p in m.parameters()}
    for stage, expect in (("symbolic", False), ("align", True)):
        chosen = trainable(model, stage)
        assert chosen and all((id(p) in vision_params) == expect for p in chosen)
        assert all(p.requires_grad == (id(p) in {id(q) for q in chosen}) for p in model.parameters())
    assert len(trainable(model, "joint")) == len(list(model.parameters()))


def test_the_align_stage_reads_the_vision_tokens_without_running_the_llm(tiny_trainee):
    model, _, batch = tiny_trainee
    adapter = adapter_for(model)
    layers = []
    handle = adapter.layers[0].register_forward_pre_hook(lambda *a: layers.append(1))
    try:
        out = vision_rows(model, adapter, batch.inputs)
    finally:
        handle.remove()
    assert not layers and out.shape == (128, model.config.get_text_config().hidden_size)
    with torch.no_grad():  # the same rows the full forward hands the LLM
        embeds = []
        handle = adapter.layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: embeds.append(kwargs.get("hidden_states", args[0] if args else None)),
            with_kwargs=True,
        )
        try:
            model(**batch.inputs)
        finally:
            handle.remove()
    torch.testing.assert_close(out.detach(), embeds[0][batch.inputs["input_ids"] == model.config.image_token_id])


def test_dropped_tokens_take_their_labels_with_them(tiny_trainee):
    """With every token kept by the cut, the loss is the model's own; with half, the LLM sees half of each
    image's tokens and the loss still covers every answer."""
    model, _, batch = tiny_trainee
    symbols = Symbols(model.config.get_text_config().hidden_size)
    torch.manual_seed(0)
    full = model(**batch.inputs).loss
    torch.testing.assert_close(stage_loss("joint", model, symbols, batch, 0.0, 0.999), full)
    half = stage_loss("joint", model, symbols, batch, 0.0, 0.5)
    assert torch.isfinite(half) and not torch.isclose(half, full)
    with pytest.raises(ValueError, match="cannot run with dropped tokens"):
        stage_loss("joint", model, symbols, batch, 1.0, 0.5)
    assert [kept_share("align", 1.0, 0, step) for step in range(20)] == [1.0] * 20
    shares = [kept_share("joint", 0.5, 0, step) for step in range(200)]
    assert 60 <= sum(s < 1 for s in shares) <= 140 and all(0.05 <= s <= 1 for s in shares)


def test_a_short_run_saves_a_loadable_model_and_its_card(tmp_path, capsys):
    """Two stages of a few seconds each on a small build: the card lists both legs with their commands, and the
    saved model loads with the rotary base it was given."""
    import json

    from transformers import AutoConfig

    from tokred.zoo.train import main

    out = tmp_path / "run"
    argv = ["--family", "qwen2_5_vl", "--out", str(out), "--stages", "symbolic", "joint", "--minutes", "0.05", "0.05"]
    argv += ["--hidden", "64", "--vision-hidden", "32", "--eval-n", "4", "--curve-n", "2", "--questions", "2"]
    argv += ["--image-size", "224", "--drop", "0.5", "--rope-theta", "50", "--keep-symbols", "--log-every", "1"]
    argv += ["--mrope-section", "2", "4", "10"]
    with torch.enable_grad():  # the suite runs under no_grad
        main(argv)
    card = json.loads((out / "card.json").read_text())
    assert [leg["stage"] for leg in card["legs"]] == ["symbolic", "joint"]
    assert all(leg["steps"] > 0 and "--drop 0.5" in leg["command"] for leg in card["legs"])
    assert card["rope_theta"] == 50 and card["media_seen"] == 8 * sum(leg["steps"] for leg in card["legs"])
    rope = AutoConfig.from_pretrained(out).get_text_config().rope_parameters
    assert rope["rope_theta"] == 50 and rope["mrope_section"] == card["mrope_section"] == [2, 4, 10]
    assert (out / "symbols.pt").is_file() and set(card["test_accuracy"]["shapes"]) >= {"all"}
    assert capsys.readouterr().out.endswith((out / "card.json").read_text())  # after any progress lines


def test_mrope_sections_must_fill_the_rotary_pairs(tmp_path):
    from tokred.zoo.train import main

    argv = ["--out", str(tmp_path / "x"), "--hidden", "64", "--vision-hidden", "32", "--image-size", "224"]
    with pytest.raises(SystemExit, match=r"three M-RoPE sections \(t, h, w\) summing to 16; got \[2, 4, 4\]"):
        main([*argv, "--mrope-section", "2", "4", "4"])


def test_a_drop_share_outside_0_1_is_refused(tmp_path, capsys):
    from tokred.zoo.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--drop", "1.5"])
    assert "--drop is a share of the steps, between 0 and 1; got 1.5" in capsys.readouterr().err
