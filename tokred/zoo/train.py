"""Train a small VLM of a real architecture from scratch on tokred's synthetic benchmarks.

    python -m tokred.zoo.train --family qwen2_5_vl --task shapes --out DIR [--stages ... --minutes ...]

The default is the curriculum of `tokred.zoo.curriculum`: ``symbolic`` (the LLM on clean symbolic vision
tokens), ``align`` (the tower and projector regressed onto the symbols) and ``joint`` (everything, on pixels),
each for its ``--minutes`` at its ``--lr`` (warm-up, then a cosine to a fifth). ``--stages`` picks and orders
them; ``--init DIR`` continues any stage from a trained checkpoint, on new samples. Samples are drawn on the fly
from `tokred.zoo.datasets.sample` (deterministic by seed and index); each image or clip carries up to
``--questions`` question/answer turns in one sequence (its own question first), so the tower runs once for
several answers, and the answer loss covers the answer tokens only. On a GPU use ``--device cuda --workers N``
(bf16 autocast; samples drawn in N processes). The result is saved with `save_pretrained` plus a card
(``card.json``) recording every leg (stage, minutes, steps, learning curve, command, machine), the test
accuracy per question type and the shuffled-image (blind) accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

import tokred
from tokred.adapters import adapter_for
from tokred.methods.random import Random
from tokred.zoo import build
from tokred.zoo.curriculum import (
    STAGES,
    Symbols,
    attention_loss,
    quadrant_seen,
    recorded_attention,
    symbolic_inputs,
    vision_mask,
    vision_rows,
)
from tokred.zoo.datasets import questions, sample
from tokred.zoo.datasets.cells import target_tokens
from tokred.zoo.prompts import MEDIA, chat, generate_answers, media_inputs


def vision_config(family: str, hidden: int, depth: int, image_size: int) -> dict:
    """Vision-tower fields of ``family`` for a tower ``hidden`` wide and ``depth`` blocks deep (32-wide heads)."""
    heads = max(1, hidden // 32)
    if family == "qwen2_vl":
        return {"depth": depth, "embed_dim": hidden, "num_heads": heads, "mlp_ratio": 2}
    if family.startswith("qwen"):
        tower = {"depth": depth, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_heads": heads}
        if family == "qwen2_5_vl":  # 112 px windows (4x4 tokens), the last block full attention
            tower |= {"window_size": 112, "fullatt_block_indexes": [depth - 1]}
        if family == "qwen3_vl":
            tower |= {"deepstack_visual_indexes": list(range(min(2, depth - 1)))}
        return tower
    # CLIP/SigLIP: 28 px patches keep a 448 px image at 16x16 tokens, like the Qwen merger.
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": depth,
        "num_attention_heads": heads,
        "patch_size": 28 if image_size >= 224 else 14,
    }


def batch_inputs(processor, kind: str, items: list[tuple[list[dict], object]], train: bool) -> dict:
    """Processor inputs for (turns, media) pairs: question/answer turns about one image or clip each.

    With ``train`` every turn's answer and end-of-turn token follow its prompt and the labels cover exactly
    those tokens; otherwise the text is the first turn's prompt, ready for generation.
    """
    eos = processor.tokenizer.eos_token
    if train:
        texts = [
            "".join(chat(processor, kind, t["question"], i == 0) + t["answer"] + eos for i, t in enumerate(turns))
            for turns, _ in items
        ]
    else:
        texts = [chat(processor, kind, turns[0]["question"]) for turns, _ in items]
    inputs = media_inputs(processor, kind, texts, [media for _, media in items])
    if train:
        inputs["labels"] = answer_labels(processor.tokenizer, inputs["input_ids"], [turns for turns, _ in items])
    return inputs


def answer_labels(tokenizer, input_ids: torch.Tensor, turns: list[list[dict]]) -> torch.Tensor:
    """Labels equal to ``input_ids`` on each answer and its end token, found in order; -100 elsewhere."""
    labels = torch.full_like(input_ids, -100)
    for b, sample_turns in enumerate(turns):
        ids, at = input_ids[b].tolist(), 0
        for turn in sample_turns:
            answer = tokenizer(turn["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            at = next(i for i in range(at, len(ids)) if ids[i : i + len(answer)] == answer)
            labels[b, at : at + len(answer)] = input_ids[b, at : at + len(answer)]
            at += len(answer)
    return labels


def turns_for(
    kind: str, record: dict, rng: np.random.Generator, limit: int, types: Sequence[str] | None = None
) -> list[dict]:
    """The record's own question, then up to ``limit - 1`` more about the same scene, types drawn evenly. With
    `types`, only questions of those types (a scene that has none keeps its own question)."""
    pool: dict[str, list[dict]] = {}
    for q in questions(kind, record, rng):
        if q["question"] != record["question"] and (types is None or q["type"] in types):
            pool.setdefault(q["type"], []).append(q)
    turns = [record] if types is None or record["type"] in types else []
    while len(turns) < limit and pool:
        qtype = list(pool)[int(rng.integers(len(pool)))]
        turns.append(pool[qtype].pop(int(rng.integers(len(pool[qtype])))))
        if not pool[qtype]:
            del pool[qtype]
    return turns or [record]


def _frames(media: Image.Image | list[Image.Image]) -> list[Image.Image]:
    return media if isinstance(media, list) else [media]


def token_grid(n_tokens: int, media: Image.Image | list[Image.Image]) -> tuple[int, int, int]:
    """The (t, h, w) grid of a square image or clip's ``n_tokens`` vision tokens (one slot per two frames)."""
    slots = max(1, len(_frames(media)) // 2)
    side = math.isqrt(n_tokens // slots)
    if slots * side * side != n_tokens:
        raise ValueError(f"{n_tokens} vision tokens are not {slots} square grids")
    return slots, side, side


def media_grid(processor, kind: str, media, vision_ids: list[int]) -> tuple[int, int, int]:
    """The (t, h, w) token grid the processor gives one image or clip."""
    inputs = media_inputs(processor, kind, [chat(processor, kind, "")], [media])
    return token_grid(int(torch.isin(inputs["input_ids"], torch.tensor(vision_ids)).sum()), media)


@dataclass
class Batch:
    """One training step: processor inputs with labels, and what the curriculum's losses need to know."""

    kind: str
    inputs: dict
    records: list[dict]
    turns: list[list[dict]]  # each medium's question/answer turns, in sequence order
    grids: list[tuple[int, int, int]]  # each medium's (t, h, w) token grid
    size: int  # the media's side in pixels
    step: int  # its place in the stream (seeds the step's random choices)


class Batches(IterableDataset):
    """Endless training batches: step ``k`` holds media ``first + k * batch_size ...`` of task ``tasks[k % n]``,
    each with its question/answer turns, as processor inputs with labels plus the records and token grids.
    Workers of a DataLoader take every ``num_workers``-th step, so the stream is the same for any number of
    workers."""

    def __init__(
        self,
        processor,
        tasks: list[str],
        batch_size: int,
        questions: int,
        seed: int,
        first: int,
        vision_ids: list[int],
        types: Sequence[str] | None = None,
    ) -> None:
        self.processor, self.tasks, self.batch_size, self.questions = processor, tasks, batch_size, questions
        self.seed, self.first, self.vision_ids, self.types = seed, first, torch.tensor(vision_ids), types

    def __iter__(self):
        worker = get_worker_info()
        step = worker.id if worker else 0
        while True:
            yield self.batch(step)
            step += worker.num_workers if worker else 1

    def batch(self, step: int) -> Batch:
        kind = self.tasks[step % len(self.tasks)]
        index = self.first + step * self.batch_size
        records = [sample(kind, "train", index + i, seed=self.seed) for i in range(self.batch_size)]
        rng = np.random.default_rng([self.seed, step])
        items = [(turns_for(kind, r, rng, self.questions, self.types), m) for r, m in records]
        inputs = batch_inputs(self.processor, kind, items, train=True)
        counts = torch.isin(inputs["input_ids"], self.vision_ids).sum(dim=1).tolist()
        grids = [token_grid(n, m) for (_, m), n in zip(records, counts, strict=True)]
        turns = [t for t, _ in items]
        size = _frames(records[0][1])[0].width
        return Batch(kind, inputs, [r for r, _ in records], turns, grids, size, step)


def accuracy(
    model,
    processor,
    kind: str,
    n: int,
    seed: int,
    batch_size: int = 25,
    symbols: Symbols | None = None,
    shuffle: bool = False,
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on the first ``n`` test questions (drawn in memory), overall and
    per question type. With `symbols` the LLM sees the scenes' symbols instead of its vision tokens;
    with `shuffle` each question gets the next question's image or clip (a blind baseline)."""
    correct: dict[str, list[bool]] = {}
    adapter = adapter_for(model)
    vision_ids = list(adapter.token_ids().values())
    for start in range(0, n, batch_size):
        records = [sample(kind, "test", i, seed=seed) for i in range(start, min(n, start + batch_size))]
        with contextlib.ExitStack() as stack:
            if symbols is not None:
                grids = [media_grid(processor, kind, m, vision_ids) for _, m in records]
                rows = symbols.batch([r for r, _ in records], grids, _frames(records[0][1])[0].width).detach()
                stack.enter_context(symbolic_inputs(adapter, lambda rows=rows: rows))
            media = [m for _, m in records]
            if shuffle:
                media = media[1:] + media[:1]
            answers, _ = generate_answers(model, processor, kind, [r["question"] for r, _ in records], media, 6)
        for a, (r, _) in zip(answers, records, strict=True):
            correct.setdefault(r["type"], []).append(a == r["answer"])
    every = [c for cs in correct.values() for c in cs]
    return {"all": sum(every) / len(every), **{t: sum(cs) / len(cs) for t, cs in sorted(correct.items())}}


def trainable(model: nn.Module, stage: str) -> list[nn.Parameter]:
    """The parameters `stage` trains (all others are frozen): the LLM side for ``symbolic``, the tower and
    projector for ``align``, everything for ``joint``."""
    adapter = adapter_for(model)
    vision = {id(p) for m in (adapter.vision_tower, adapter.projector) for p in m.parameters()}
    chosen = [p for p in model.parameters() if stage == "joint" or (id(p) in vision) == (stage == "align")]
    keep = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return chosen


def stage_loss(
    stage: str, model: nn.Module, symbols: Symbols, batch: Batch, attention_weight: float, keep: float = 1.0
) -> torch.Tensor:
    """The answer loss on symbols (``symbolic``) or pixels (``joint``), plus `attention_weight` times the
    attention loss of the last two LLM layers; or the vision tokens' error against the symbols (``align``,
    `Symbols.align_loss`). With `keep` below 1 the LLM sees only that share of each medium's vision tokens
    (tokred's own ``random`` cut before the LLM), so that it learns to answer from whichever tokens remain."""
    adapter = adapter_for(model)
    if stage == "align":
        out = vision_rows(model, adapter, batch.inputs).float()
        return symbols.align_loss(out, symbols.batch(batch.records, batch.grids, batch.size).detach())
    if keep < 1 and attention_weight:
        raise ValueError("the attention loss reads the full sequence's positions; it cannot run with dropped tokens")
    layers = list(range(len(adapter.layers)))[-2:] if attention_weight else []
    with contextlib.ExitStack() as stack:
        if stage == "symbolic":
            rows = symbols.batch(batch.records, batch.grids, batch.size)
            stack.enter_context(symbolic_inputs(adapter, lambda: rows))
        if keep < 1:  # tokred cuts the labels with the tokens
            stack.enter_context(tokred.patched(model, Random(keep=keep, seed=batch.step)))
        records = stack.enter_context(recorded_attention(adapter, layers))
        loss = model(**batch.inputs).loss
    if layers:
        queries = answer_queries(adapter, batch)
        loss = loss + attention_weight * attention_loss(records, queries, batch.inputs.get("attention_mask"))
    return loss


def answer_queries(adapter, batch: Batch) -> list[tuple[int, int, torch.Tensor]]:
    """(sample, position of the token before the answer, positions of the vision tokens covering the objects
    the turn's answer rests on) for every turn with such objects."""
    labels, vision = batch.inputs["labels"], vision_mask(adapter, batch.inputs["input_ids"])
    starts = (labels != -100) & (F.pad(labels, (1, 0), value=-100)[:, :-1] == -100)
    out = []
    for b, (record, turns, grid) in enumerate(zip(batch.records, batch.turns, batch.grids, strict=True)):
        positions = vision[b].nonzero()[:, 0]
        for turn, start in zip(turns, starts[b].nonzero()[:, 0].tolist(), strict=True):
            cells = target_tokens({"objects": record["objects"], "targets": turn["targets"]}, grid, batch.size)
            if cells.any():
                out.append((b, start - 1, positions[torch.from_numpy(cells).to(positions.device)]))
    return out


def kept_share(stage: str, drop: float, seed: int, step: int) -> float:
    """The share of vision tokens the LLM sees at this step: 1, or with probability `drop` (answer-loss stages
    only) a share drawn uniformly from [0.05, 1)."""
    rng = np.random.default_rng([seed, step, 1])
    if stage == "align" or rng.random() >= drop:
        return 1.0
    return float(rng.uniform(0.05, 1.0))


def run_stage(
    stage: str, minutes: float, lr: float, model, processor, symbols: Symbols, loader, args: argparse.Namespace
) -> dict:
    """Train one stage for `minutes` (warm-up, then a cosine that decays to a fifth of `lr`); the leg's record,
    with a learning curve of test accuracy (on symbols in the ``symbolic`` stage)."""
    params = trainable(model, stage) + (list(symbols.parameters()) if stage == "symbolic" else [])
    symbols.requires_grad_(stage == "symbolic")
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    tasks = list(dict.fromkeys(args.task))
    start, step, curve, next_eval = time.monotonic(), 0, [], args.eval_every

    def measure() -> dict:
        model.eval()
        seen = symbols if stage == "symbolic" else None
        result = {k: accuracy(model, processor, k, args.curve_n, args.seed, symbols=seen) for k in tasks}
        model.train()
        return {"minutes": round((time.monotonic() - start) / 60, 1), "step": step, "accuracy": result}

    while (elapsed := time.monotonic() - start) < 60 * minutes:
        progress = elapsed / (60 * minutes)
        scale = min(1.0, (step + 1) / args.warmup) * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        batch = next(loader)
        batch.inputs = batch.inputs.to(args.device)
        keep = kept_share(stage, args.drop, args.seed, batch.step)
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.device != "cpu"):
            loss = stage_loss(stage, model, symbols, batch, args.attention_weight, keep)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), optimizer.zero_grad()
        step += 1
        if step % args.log_every == 0:
            print(f"{stage} step {step} {batch.kind} loss {loss.item():.3f} lr {lr * scale:.2e} ({elapsed:.0f} s)")
        if elapsed >= 60 * next_eval:
            curve.append(measure())
            print(f"{stage} {json.dumps(curve[-1])}", flush=True)
            next_eval += args.eval_every
    curve.append(measure())
    return {
        "stage": stage,
        "minutes": round((time.monotonic() - start) / 60, 1),
        "steps": step,
        "lr": lr,
        "curve": curve,
    }


def train(args: argparse.Namespace) -> dict:
    """Run the stages in order on a fresh model (or continue `--init`'s); save it with its card and return the card."""
    torch.manual_seed(args.seed)
    previous = json.loads((Path(args.init) / "card.json").read_text()) if args.init else None
    if previous:  # the sizes are the earlier run's; its samples are skipped so that every sample is new
        text, vision, args.family = previous["text"], previous["vision"], previous["family"]
    else:
        text = {
            "hidden_size": args.hidden,
            "intermediate_size": 2 * args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.hidden // 32,
            "num_key_value_heads": max(1, args.hidden // 64),
        }
        vision = vision_config(args.family, args.vision_hidden, args.vision_depth, args.image_size)
    with tempfile.TemporaryDirectory() as scratch:
        init = args.init or build(
            args.family, scratch, seed=args.seed, vision=vision, image_size=args.image_size, **text
        )
        config = AutoConfig.from_pretrained(init)
        rope = config.get_text_config().rope_parameters  # the rotary tables are built from the config at load
        if args.rope_theta is not None:
            rope["rope_theta"] = args.rope_theta
        if args.mrope_section is not None:
            if "mrope_section" not in rope or sum(args.mrope_section) != sum(rope["mrope_section"]):
                raise SystemExit(
                    f"--mrope-section: {args.family} takes three M-RoPE sections (t, h, w) summing to "
                    f"{sum(rope.get('mrope_section', [])) or 'nothing (no M-RoPE)'}; got {args.mrope_section}"
                )
            rope["mrope_section"] = list(args.mrope_section)
        model = AutoModelForImageTextToText.from_pretrained(init, config=config, attn_implementation="sdpa")
        model = model.to(args.device).train()
        processor = AutoProcessor.from_pretrained(init)
    vision_ids = list(adapter_for(model).token_ids().values())
    first = previous["media_seen"] if previous else 0
    legs = list(previous["legs"]) if previous else []
    symbols = Symbols(model.config.get_text_config().hidden_size, quadrant_seen(args.family)).to(args.device)
    if args.init and (Path(args.init) / SYMBOLS).is_file():
        symbols.load_state_dict(torch.load(Path(args.init) / SYMBOLS))
    for stage, minutes, lr in zip(args.stages, args.minutes, args.lr, strict=True):
        batches = Batches(
            processor, args.task, args.batch_size, args.questions, args.seed, first, vision_ids, args.types
        )
        loader = iter(
            DataLoader(batches, batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None)
        )
        leg = run_stage(stage, minutes, lr, model, processor, symbols, loader, args)
        first += leg["steps"] * args.batch_size
        legs.append(leg | {"command": args.command, "machine": machine(model)})
    model.eval()
    tasks = list(dict.fromkeys(args.task))
    card = {
        "family": args.family,
        "tasks": tasks,
        "text": text,
        "vision": vision,
        "image_size": args.image_size,
        "rope_theta": model.config.get_text_config().rope_parameters["rope_theta"],
        "mrope_section": model.config.get_text_config().rope_parameters.get("mrope_section"),
        "seed": args.seed,
        "media_seen": first,
        "data": "train split drawn on the fly from tokred.zoo.datasets.sample(task, 'train', i, seed)",
        "questions_per_medium": args.questions,
        "batch_size": args.batch_size,
        "legs": legs,
        "train_minutes": round(sum(leg["minutes"] for leg in legs), 1),
        "test_accuracy": {k: accuracy(model, processor, k, args.eval_n, args.seed) for k in tasks},
        "shuffled_image_accuracy": {
            k: accuracy(model, processor, k, args.eval_n, args.seed, shuffle=True)["all"] for k in tasks
        },
        "eval_questions": args.eval_n,
    }
    for p in model.parameters():
        p.requires_grad_(True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    if args.keep_symbols:
        torch.save(symbols.state_dict(), Path(args.out) / SYMBOLS)
    card["size_mb"] = round(sum(f.stat().st_size for f in Path(args.out).iterdir()) / 2**20, 1)
    (Path(args.out) / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


SYMBOLS = "symbols.pt"
"""The learned symbol vectors, kept beside a checkpoint (``--keep-symbols``) so ``--init`` can continue the
symbolic or align stage; not part of the model."""


def machine(model: nn.Module) -> str:
    return f"{platform.machine()}, {torch.get_num_threads()} threads, {next(model.parameters()).device}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokred.zoo.train", description=__doc__)
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument(
        "--task", action="append", choices=list(MEDIA), help="repeat to train on several, in turn (default: shapes)"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", help="continue from this trained checkpoint (its card's sizes; new samples only)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run in this order")
    parser.add_argument("--minutes", nargs="+", type=float, help="one per stage (default: 40 10 25 for the three)")
    parser.add_argument("--lr", nargs="+", type=float, help="one per stage (default: 1e-3 1e-3 5e-4)")
    parser.add_argument("--hidden", type=int, default=128, help="LLM width")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers")
    parser.add_argument("--vision-hidden", type=int, default=96)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument(
        "--image-size", type=int, default=448, help="the processor's largest image side (LLaVA: the tower's input)"
    )
    parser.add_argument("--questions", type=int, default=8, help="question/answer turns per image or clip")
    parser.add_argument(
        "--types", nargs="+", help="train on these question types only (e.g. quadrant), for a leg that focuses"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=150, help="warm-up steps of each stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=200, help="test questions per task for the card")
    parser.add_argument("--curve-n", type=int, default=100, help="test questions per task at each curve point")
    parser.add_argument("--eval-every", type=float, default=5.0, help="minutes between curve points")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes drawing and preparing samples")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bf16 autocast on GPUs"
    )
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--attention-weight",
        type=float,
        default=0.0,
        help="weight of the loss that teaches head 0 of the last two LLM layers to attend from the token before "
        "each answer to the objects it rests on (symbolic and joint stages; 0: off)",
    )
    parser.add_argument(
        "--drop",
        type=float,
        default=0.0,
        help="share of the answer-loss steps on which the LLM sees only a random share (5-100%%) of the vision "
        "tokens, so that its answers rest on the tokens of the objects asked about (0: off)",
    )
    parser.add_argument(
        "--rope-theta",
        type=float,
        help="set the LLM's rotary base before training (e.g. to continue a model on another)",
    )
    parser.add_argument(
        "--mrope-section",
        nargs=3,
        type=int,
        metavar=("T", "H", "W"),
        help="the LLM's M-RoPE (t, h, w) frequency pairs before training: sections in a row give w the lowest "
        "frequencies, so a larger w section lets the LLM tell left from right",
    )
    parser.add_argument("--keep-symbols", action="store_true", help=f"also save {SYMBOLS}, to continue stages 1-2")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m tokred.zoo.train", *(sys.argv[1:] if argv is None else argv)])
    args.task = args.task or ["shapes"]
    if not 0.0 <= args.drop <= 1.0:
        parser.error(f"--drop is a share of the steps, between 0 and 1; got {args.drop}")
    if args.family == "qwen3_vl" and "symbolic" in args.stages:
        parser.error(
            "the symbolic stage hands the model its vision features, which Qwen3-VL (deepstack) cannot "
            "take; train qwen3_vl with --stages joint"
        )
    for name, defaults in (("minutes", DEFAULT_MINUTES), ("lr", DEFAULT_LR)):
        given = getattr(args, name) or [defaults[STAGES.index(s)] for s in args.stages]
        if len(given) != len(args.stages):
            parser.error(f"--{name} takes one value per stage ({len(args.stages)}), got {len(given)}")
        setattr(args, name, given)
    print(json.dumps(train(args), indent=2))


DEFAULT_MINUTES = (40.0, 10.0, 25.0)
"""Minutes of each stage by default (symbolic, align, joint): most of the budget to the cheap symbolic stage."""
DEFAULT_LR = (1e-3, 1e-3, 5e-4)
"""Learning rates of each stage by default: at 2.5e-3 the symbolic stage stalled near the answer prior."""


if __name__ == "__main__":
    main()
