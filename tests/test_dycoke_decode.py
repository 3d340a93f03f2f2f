"""DyCoke's decode-time KV pruning: the rule on plain tensors against one written from the paper, then on the
tiny checkpoints: each step keeps what eager attention at the measuring layer ranks highest, the later layers
read exactly those (pruning equals masking them), a sample keeps the same alone and batched, every family takes
it, decode_keep=1 is plain DyCoke bit for bit, and bad settings are refused."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import VIDEO_FAMILIES, _tiny, noise_image
from transformers import AutoConfig, LogitsProcessor, LogitsProcessorList

import tokred
from tokred import DyCoke, FastV, compat
from tokred.adapters import adapter_for
from tokred.stages.decode_prune import DECODE

STEPS = 4
QWEN = ("qwen2_vl", "qwen2_5_vl")


def budget(n: int, keep: float) -> int:
    return max(1, int(keep * n + 0.5))


def reference_keep(scores: list[float], keep: float) -> list[int]:
    """The paper's rule by hand: the share `keep` of a span's tokens that the step's query attends to most
    (rounded half up, at least one; ties to the earlier token), in ascending order."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[: budget(len(scores), keep)])


# -- the rule --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "keep"), [(1, 0.3), (7, 0.3), (20, 0.7), (33, 0.05), (64, 0.5), (10, 0.99)])
def test_each_step_keeps_the_most_attended_share(n, keep):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    kept = DyCoke(decode_keep=keep).decode_select(scores)
    assert kept.dtype == torch.long and kept.tolist() == reference_keep(scores.tolist(), keep)


def test_ties_go_to_the_earlier_token():
    scores = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.3])
    assert DyCoke(decode_keep=0.4).decode_select(scores).tolist() == [1, 2]


# -- settings --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_a_bad_decode_keep_is_refused(bad):
    with pytest.raises(ValueError, match=r"DyCoke.decode_keep must be a number in \(0, 1\]"):
        DyCoke(decode_keep=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_a_bad_decode_layer_is_refused(bad):
    with pytest.raises(ValueError, match="DyCoke.decode_layer must be an integer >= 0"):
        DyCoke(decode_keep=0.5, decode_layer=bad)


def test_idle_only_when_both_stages_are_off_and_the_text_form_round_trips():
    assert DyCoke(keep=1.0).idle and not DyCoke(keep=1.0, decode_keep=0.5).idle
    assert DyCoke(keep=0.25, decode_keep=0.5).as_idle() == DyCoke(keep=1.0)
    config = tokred.Config.parse("dycoke:keep=0.25:decode_keep=0.3:decode_layer=1")
    assert config.prune == (DyCoke(keep=0.25, decode_keep=0.3, decode_layer=1),)
    assert tokred.Config.parse(str(config)) == config


@pytest.mark.parametrize("other", [FastV(), tokred.KIVI(bits=2)], ids=["llm", "kv"])
def test_methods_that_cut_or_pack_the_cache_cannot_go_with_decode_pruning(other):
    with pytest.raises(ValueError, match=f"dycoke with decode pruning .* so {other.name} .* cannot go with it"):
        tokred.Config(prune=[DyCoke(decode_keep=0.5), other])
    tokred.Config(prune=[DyCoke(keep=0.5), other])  # plain DyCoke still combines
    tokred.Config(prune=[DyCoke(decode_keep=0.5), other.as_idle()])  # and pruning with an idle one


# -- on the models ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=QWEN)
def qwen(request, zoo_root):
    return _tiny(request.param, zoo_root)


class Snapshots(LogitsProcessor):
    """What the decode pruning kept at each step of a generate() call (None at the prefill's step, and for a model
    that is not patched)."""

    def __init__(self, model) -> None:
        self.model, self.steps = model, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        patched = hasattr(self.model, "_tokred_session")
        self.steps.append(tokred.stats(self.model).kept_positions.get(DECODE) if patched else None)
        return scores


def generate(model, inputs: dict, **kwargs):
    """Greedy STEPS tokens (never a media placeholder) with each step's decode cut; (output, snapshots)."""
    snapshots = Snapshots(model)
    out = model.generate(
        **inputs,
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
        suppress_tokens=list(adapter_for(model).token_ids().values()),
        logits_processor=LogitsProcessorList([snapshots]),
        return_dict_in_generate=True,
        **kwargs,
    )
    return out, snapshots.steps


@pytest.mark.parametrize(("keep", "layer"), [(1.0, 1), (0.5, 2)])
def test_each_step_keeps_what_eager_attention_at_the_layer_ranks_highest(qwen, keep, layer):
    """The eager model, patched: its own attention weights at `decode_layer` (all keys, head mean) rank each
    step's kept tokens, and every later layer attends over exactly the text, the kept and the generated."""
    model = qwen.load(attn_implementation="eager")
    inputs, decode_keep = qwen.video(), 0.3
    with tokred.patched(model, DyCoke(keep=keep, decode_keep=decode_keep, decode_layer=layer)):
        out, steps = generate(model, inputs, output_attentions=True)
        entered = tokred.stats(model).kept_positions.get("pre_llm", [None])[0]
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
    if entered is not None:  # TTM cut: the LLM's sequence is the text and the tokens it kept, then the new ones
        assert len(entered) == budget(len(video), keep)
        sequence = torch.cat([(inputs["input_ids"][0] != model.config.video_token_id).nonzero()[:, 0], entered])
        sequence, video = sequence.sort().values, entered
    else:
        sequence = torch.arange(inputs["input_ids"].shape[1])
    rows = torch.isin(sequence, video).nonzero()[:, 0]  # where the video's tokens sit in the LLM's sequence
    k = budget(len(video), decode_keep)
    assert steps[0] is None and len(steps) == STEPS
    for step in range(1, STEPS):
        attentions = out.attentions[step]  # per layer (1, H, 1, keys)
        scores = attentions[layer][0, :, -1].mean(0)[rows]
        expected = sequence[rows[reference_keep(scores.tolist(), decode_keep)]]
        assert steps[step][0].tolist() == expected.tolist(), step
        keys = len(sequence) + step
        assert [a.shape[-1] for a in attentions] == [keys] * (layer + 1) + [keys - len(video) + k] * (
            len(attentions) - layer - 1
        ), step


def _mask_later_layers(module, query, key, value, attention_mask, *, layer: int, dropped, **kwargs):
    """Reference attention (sdpa): at decode steps, the layers after `layer` mask out the keys `dropped()` names."""
    hidden = dropped()
    if module.layer_idx > layer and query.shape[2] == 1 and hidden is not None:
        allowed = torch.ones(key.shape[2], dtype=torch.bool)
        allowed[hidden] = False
        allowed = allowed[None, None, None, :]
        attention_mask = allowed if attention_mask is None else attention_mask & allowed
    return compat.attention_kernel(module, "sdpa")(module, query, key, value, attention_mask, **kwargs)


def test_pruning_the_decode_cache_equals_masking_it(qwen):
    """The stock model with each step's dropped tokens masked out as keys of the layers after `decode_layer` (and
    every layer seeing everything at the prefill) gives the patched model's logits, step by step."""
    model, inputs, layer = qwen.model, qwen.video(), 1
    with tokred.patched(model, DyCoke(keep=1.0, decode_keep=0.25, decode_layer=layer)):
        pruned, steps = generate(model, inputs, output_logits=True)
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
    forwards = []  # one entry per LLM forward of the reference: the prefill, then each decode step

    def dropped() -> torch.Tensor | None:
        kept = steps[len(forwards) - 1]
        return None if kept is None else video[~torch.isin(video, kept[0])]

    reference = qwen.load(attn_implementation="sdpa")
    name = f"test_mask_later_layers_{qwen.family}"
    compat.register_attention(name, functools.partial(_mask_later_layers, layer=layer, dropped=dropped))
    language_model = adapter_for(reference).language_model
    language_model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    for attention in (block.self_attn for block in language_model.layers):
        attention.config = compat.with_attention_function(attention.config, name)
    masked, _ = generate(reference, inputs, output_logits=True)
    assert len(forwards) == STEPS and all(s is not None for s in steps[1:])
    assert torch.equal(masked.sequences, pruned.sequences)
    for step in range(STEPS):
        assert torch.allclose(masked.logits[step], pruned.logits[step], atol=1e-5), step


def video_prompts(tiny, seeds: list[int], texts: list[str]) -> dict:
    """One noise video of eight frames per seed, each with its question, left-padded into one batch."""
    tiny.processor.tokenizer.padding_side = "left"
    videos = [[noise_image(seed * 100 + f) for f in range(8)] for seed in seeds]
    prompts = [tiny.prompt("video", text=t) for t in texts]
    return tiny.processor(videos=videos, text=prompts, return_tensors="pt", padding=True)


def test_a_sample_keeps_the_same_alone_and_batched(qwen):
    """Two videos with prompts of different lengths, TTM cutting before the LLM too: each sample's kept tokens at
    every step, and what it generates, are those of the sample alone."""
    seeds, texts = [1, 2], ["what moved?", "did anything in this clip move at all, and where?"]
    batch = video_prompts(qwen, seeds, texts)
    width = batch["input_ids"].shape[1]
    with tokred.patched(qwen.model, DyCoke(keep=0.5, decode_keep=0.3, decode_layer=1)):
        together, steps = generate(qwen.model, batch)
        for b in range(2):
            alone = video_prompts(qwen, seeds[b : b + 1], texts[b : b + 1])
            single, single_steps = generate(qwen.model, alone)
            pad = width - alone["input_ids"].shape[1]
            assert together.sequences[b, width:].tolist() == single.sequences[0, width - pad :].tolist(), b
            for step in range(1, STEPS):
                assert (steps[step][b] - pad).tolist() == single_steps[step][0].tolist(), (b, step)
    assert int((batch["attention_mask"] == 0).sum()) > 0  # the batch was padded


def test_every_family_keeps_the_share_of_each_image_or_video(tiny):
    """Images and videos alike: at every decode step the sample's one image or video keeps the decode share of
    what TTM left it."""
    method = DyCoke(keep=0.5, decode_keep=0.25, decode_layer=1)
    kinds = ("image", "video") if tiny.family in VIDEO_FAMILIES else ("image",)
    for kind in kinds:
        inputs = tiny.inputs(kind)
        with tokred.patched(tiny.model, method):
            out, steps = generate(tiny.model, inputs)
            stats = tokred.stats(tiny.model)
        entered = stats.kept_positions["pre_llm"][0]
        assert [m[0] for m in stats.media[0]] == [kind] and list(stats.vision_tokens) == ["input", "pre_llm", DECODE]
        assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + STEPS
        for step in range(1, STEPS):
            kept = steps[step][0]
            assert len(kept) == budget(len(entered), 0.25) and bool(torch.isin(kept, entered).all()), (kind, step)


def test_decode_keep_one_is_plain_dycoke_and_a_full_share_changes_nothing(qwen):
    """decode_keep=1 is plain DyCoke bit for bit; a share that rounds to every token installs the pruning and
    measures each step, and still changes nothing."""
    inputs = qwen.video()
    with tokred.patched(qwen.model, DyCoke(keep=0.5)):
        plain, _ = generate(qwen.model, inputs, output_logits=True)
    for decode_keep in (1.0, 0.999):
        with tokred.patched(qwen.model, DyCoke(keep=0.5, decode_keep=decode_keep)):
            same, steps = generate(qwen.model, inputs, output_logits=True)
            stats = tokred.stats(qwen.model)
        assert torch.equal(same.sequences, plain.sequences)
        assert all(torch.equal(a, b) for a, b in zip(same.logits, plain.logits, strict=True))
        if decode_keep < 1:  # measured, and kept every token TTM left
            assert stats.vision_tokens[DECODE] == stats.vision_tokens["pre_llm"]
        else:
            assert DECODE not in stats.vision_tokens and steps == [None] * STEPS
    with tokred.patched(qwen.model, DyCoke(keep=0.5, decode_keep=0.25)):
        pruned, _ = generate(qwen.model, inputs, output_logits=True)
    assert not torch.equal(pruned.logits[1], plain.logits[1])  # the prefill's token is the same, later ones not


def test_without_a_cache_there_are_no_decode_steps_to_prune(qwen):
    """use_cache=False recomputes the whole sequence at each step, a prefill: its tokens are plain DyCoke's."""
    inputs = qwen.video()
    with tokred.patched(qwen.model, DyCoke(keep=0.5)):
        plain, _ = generate(qwen.model, inputs)
    with tokred.patched(qwen.model, DyCoke(keep=0.5, decode_keep=0.25)):
        uncached, steps = generate(qwen.model, inputs, use_cache=False)
    assert torch.equal(uncached.sequences, plain.sequences) and steps == [None] * STEPS


def test_a_decode_layer_past_the_llm_is_refused(qwen):
    depth = len(adapter_for(qwen.model).layers)
    with pytest.raises(
        ValueError, match=f"DyCoke.decode_layer={depth - 1} is out of range .* allowed: 0 to {depth - 2}"
    ):
        tokred.patch(qwen.model, DyCoke(decode_keep=0.5, decode_layer=depth - 1))
    assert not hasattr(qwen.model, "_tokred_session")


def test_layers_that_do_not_hold_the_whole_cache_are_refused(qwen):
    """Sliding-window layers hold only their window: a decode step there says why it cannot prune."""
    config = AutoConfig.from_pretrained(qwen.path)
    text = config.get_text_config()
    text.use_sliding_window, text.sliding_window, text.max_window_layers = True, 16, 2
    text.layer_types = ["full_attention"] * 2 + ["sliding_attention"] * (text.num_hidden_layers - 2)
    model = qwen.load(config=config)
    refusal = "decode pruning reads every cached token at each layer, but LLM layer 2 holds 16 keys"
    with tokred.patched(model, DyCoke(decode_keep=0.5, decode_layer=1)), pytest.raises(ValueError, match=refusal):
        generate(model, qwen.video())
