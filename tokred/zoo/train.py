"""Train a small VLM of a real architecture from scratch on tokred's synthetic benchmarks.

    python -m tokred.zoo.train --family qwen2_5_vl --task shapes --task motion --out DIR

Samples are drawn on the fly from `tokred.zoo.datasets.sample` (deterministic by seed and index). Each image
or clip carries up to ``--questions`` question/answer turns in one sequence (its own question first), so the
vision tower runs once for several answers, and the loss covers the answer tokens only. A linear probe on the
vision tokens as they enter the LLM learns each object's colour and shape from the coverage-weighted mean of
its tokens, and each token's quadrant (``--aux-weight``): dense supervision for the from-scratch tower, shaped
like what the LLM's attention must read. The probe is discarded; the saved checkpoint is the plain
architecture. On a GPU use ``--device cuda --workers N`` (bf16 autocast; samples drawn in N processes). The
run stops at ``--steps`` or ``--minutes``, whichever comes first, and is saved with `save_pretrained` plus a
model card with the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokred.adapters import adapter_for
from tokred.zoo import build
from tokred.zoo.datasets import COLOURS, SHAPES, questions, sample
from tokred.zoo.datasets.common import shape_mask
from tokred.zoo.prompts import MEDIA, chat, generate_answers, media_inputs

PROBE_CLASSES = (len(COLOURS), len(SHAPES), 4)  # colour and shape per object, quadrant per token


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


def turns_for(kind: str, record: dict, rng: np.random.Generator, limit: int) -> list[dict]:
    """The record's own question, then up to ``limit - 1`` more about the same scene, types drawn evenly."""
    pool: dict[str, list[dict]] = {}
    for q in questions(kind, record, rng):
        if q["question"] != record["question"]:
            pool.setdefault(q["type"], []).append(q)
    turns = [record]
    while len(turns) < limit and pool:
        qtype = list(pool)[int(rng.integers(len(pool)))]
        turns.append(pool[qtype].pop(int(rng.integers(len(pool[qtype])))))
        if not pool[qtype]:
            del pool[qtype]
    return turns


def probe_targets(record: dict, grid: tuple[int, int, int], size: int) -> tuple[torch.Tensor, ...]:
    """Probe targets of one image or clip whose vision tokens form a (t, h, w) grid over a ``size``-pixel square.

    Per object visible in a slot (clip slot ``t`` shows frame ``2 t``: temporal patches of two frames), the share
    of each token's cell its pixels cover, (n, t*h*w), and its colour and shape, (n, 2); per token its quadrant,
    (t*h*w,). Pooling a token set by coverage is what the LLM's attention does to answer "what shape is the red
    object?", so the probe asks the tower for features whose object mean tells those apart; the quadrant puts
    absolute position into each token.
    """
    t, h, w = grid
    cell = size // w
    if cell * w != size or cell * h != size:
        raise ValueError(f"a {h}x{w} token grid does not tile a {size} px square")
    weights, labels = [], []
    for o in record["objects"]:
        shares: dict[tuple[int, int], torch.Tensor] = {}  # per position: drawn once while the object stays there
        for slot in range(t):
            frame = 2 * slot
            if "track" in o and not o["appear"] <= frame < o["disappear"]:
                continue
            cx, cy = o["track"][frame] if "track" in o else (o["cx"], o["cy"])
            if (cx, cy) not in shares:
                mask = torch.from_numpy(shape_mask(o["shape"], cx, cy, o["size"], size, size))
                shares[cx, cy] = mask.reshape(h, cell, w, cell).float().mean(dim=(1, 3))
            cover = torch.zeros(t, h, w)
            cover[slot] = shares[cx, cy]
            weights.append(cover.reshape(-1))
            labels.append([list(COLOURS).index(o["colour"]), SHAPES.index(o["shape"])])
    rows, cols = torch.arange(h)[:, None] >= h / 2, torch.arange(w)[None, :] >= w / 2
    quadrants = (2 * rows.long() + cols.long()).expand(t, h, w).reshape(-1)
    return torch.stack(weights), torch.tensor(labels), quadrants


class Probe(nn.Module):
    """Linear read-outs (training only): each object's colour and shape from the coverage-weighted mean of its
    vision tokens, and each token's quadrant."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.head = nn.Linear(hidden, sum(PROBE_CLASSES))

    def logits(self, tokens: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Colour and shape logits per object, quadrant logits per token."""
        colour, shape, _ = self.head((weights @ tokens) / weights.sum(dim=1, keepdim=True)).split(PROBE_CLASSES, -1)
        return colour, shape, self.head(tokens)[:, -PROBE_CLASSES[-1] :]

    def loss(self, tokens: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor, quadrants: torch.Tensor):
        colour, shape, quadrant = self.logits(tokens, weights)
        targets = (labels[:, 0], labels[:, 1], quadrants)
        return sum(F.cross_entropy(x, y) for x, y in zip((colour, shape, quadrant), targets, strict=True)) / 3


def collate_probes(targets: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The probe targets of a batch, whose vision tokens are concatenated in sample order."""
    weights, labels, quadrants = zip(*targets, strict=True)
    return torch.block_diag(*weights), torch.cat(labels), torch.cat(quadrants)


class LLMInputs:
    """Keeps the embeddings the LLM was last called with (a forward pre-hook), to read the vision rows from."""

    def __init__(self, model: nn.Module) -> None:
        self.embeds: torch.Tensor | None = None
        adapter_for(model).language_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.embeds = kwargs["inputs_embeds"]


def _frames(media: Image.Image | list[Image.Image]) -> list[Image.Image]:
    return media if isinstance(media, list) else [media]


def token_grid(n_tokens: int, media: Image.Image | list[Image.Image]) -> tuple[int, int, int]:
    """The (t, h, w) grid of a square image or clip's ``n_tokens`` vision tokens (one slot per two frames)."""
    slots = max(1, len(_frames(media)) // 2)
    side = math.isqrt(n_tokens // slots)
    if slots * side * side != n_tokens:
        raise ValueError(f"{n_tokens} vision tokens are not {slots} square grids")
    return slots, side, side


class Batches(IterableDataset):
    """Endless training batches: step ``k`` holds media ``first + k * batch_size ...`` of task ``tasks[k % n]``,
    each with its question/answer turns, as processor inputs with labels plus the probe targets. Workers of a
    DataLoader take every ``num_workers``-th step, so the stream is the same for any number of workers."""

    def __init__(
        self, processor, tasks: list[str], batch_size: int, questions: int, seed: int, first: int, vision_ids: list[int]
    ) -> None:
        self.processor, self.tasks, self.batch_size, self.questions = processor, tasks, batch_size, questions
        self.seed, self.first, self.vision_ids = seed, first, torch.tensor(vision_ids)

    def __iter__(self):
        worker = get_worker_info()
        step = worker.id if worker else 0
        while True:
            yield self.batch(step)
            step += worker.num_workers if worker else 1

    def batch(self, step: int) -> tuple[str, dict, tuple[torch.Tensor, ...]]:
        kind = self.tasks[step % len(self.tasks)]
        index = self.first + step * self.batch_size
        records = [sample(kind, "train", index + i, seed=self.seed) for i in range(self.batch_size)]
        rng = np.random.default_rng([self.seed, step])
        items = [(turns_for(kind, r, rng, self.questions), m) for r, m in records]
        inputs = batch_inputs(self.processor, kind, items, train=True)
        counts = torch.isin(inputs["input_ids"], self.vision_ids).sum(dim=1).tolist()
        grids = [token_grid(n, m) for (_, m), n in zip(records, counts, strict=True)]
        return (
            kind,
            inputs,
            collate_probes(
                [probe_targets(r, g, _frames(m)[0].width) for (r, m), g in zip(records, grids, strict=True)]
            ),
        )


def accuracy(model, processor, kind: str, n: int, seed: int, batch_size: int = 25) -> float:
    """Exact-match accuracy of greedy answers on the first ``n`` test questions (drawn in memory)."""
    correct = 0
    for start in range(0, n, batch_size):
        records = [sample(kind, "test", i, seed=seed) for i in range(start, min(n, start + batch_size))]
        answers, _ = generate_answers(
            model, processor, kind, [r["question"] for r, _ in records], [m for _, m in records], 6
        )
        correct += sum(a.strip() == r["answer"] for a, (r, _) in zip(answers, records, strict=True))
    return correct / n


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    text = {
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 32,
        "num_key_value_heads": max(1, args.hidden // 64),
    }
    vision = vision_config(args.family, args.vision_hidden, args.vision_depth, args.image_size)
    previous = json.loads((Path(args.init) / "card.json").read_text()) if args.init else None
    with tempfile.TemporaryDirectory() as scratch:
        init = args.init or build(
            args.family, scratch, seed=args.seed, vision=vision, image_size=args.image_size, **text
        )
        model = AutoModelForImageTextToText.from_pretrained(init, attn_implementation="sdpa").to(args.device).train()
        processor = AutoProcessor.from_pretrained(init)
    if previous:  # the sizes are the earlier run's; its samples are skipped so that every sample is new
        text, vision, args.family = previous["text"], previous["vision"], previous["family"]
    vision_ids = list(adapter_for(model).token_ids().values())
    vision_id_tensor = torch.tensor(vision_ids, device=args.device)
    llm_inputs, probe = LLMInputs(model), Probe(model.config.get_text_config().hidden_size).to(args.device)
    params = [*model.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    first = previous["media_seen"] if previous else 0
    batches = Batches(processor, args.task, args.batch_size, args.questions, args.seed, first, vision_ids)
    loader = iter(
        DataLoader(batches, batch_size=None, num_workers=args.workers, prefetch_factor=4 if args.workers else None)
    )
    start, step = time.monotonic(), 0

    def progress() -> float:
        return min(1.0, max(step / args.steps, (time.monotonic() - start) / (60 * args.minutes)))

    while progress() < 1.0:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress()))
        for group in optimizer.param_groups:
            group["lr"] = lr
        kind, inputs, targets = next(loader)
        inputs, targets = inputs.to(args.device), [t.to(args.device) for t in targets]
        with torch.autocast(inputs["input_ids"].device.type, dtype=torch.bfloat16, enabled=args.device != "cpu"):
            answer_loss = model(**inputs).loss
        vision_rows = torch.isin(inputs["input_ids"], vision_id_tensor)
        probe_loss = probe.loss(llm_inputs.embeds[vision_rows].float(), *targets)
        (answer_loss + args.aux_weight * probe_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step(), optimizer.zero_grad()
        step += 1
        if step % args.log_every == 0:
            elapsed = time.monotonic() - start
            losses = f"answer {answer_loss.item():.3f} probe {probe_loss.item():.3f}"
            print(f"step {step} {kind} {losses} lr {lr:.2e} ({elapsed:.0f} s)", flush=True)
    minutes = (time.monotonic() - start) / 60
    model.eval()
    results = {k: accuracy(model, processor, k, args.eval_n, args.seed) for k in dict.fromkeys(args.task)}
    card = {
        "command": " ".join(["python -m tokred.zoo.train", *sys.argv[1:]]),
        "family": args.family,
        "tasks": list(dict.fromkeys(args.task)),
        "task_schedule": args.task,
        "text": text,
        "vision": vision,
        "image_size": args.image_size,
        "seed": args.seed,
        "steps": step,
        "media_seen": first + step * args.batch_size,
        "data": "train split drawn on the fly from tokred.zoo.datasets.sample(task, 'train', i, seed)",
        "questions_per_medium": args.questions,
        "aux_weight": args.aux_weight,
        "size_mb": None,
        "lr": args.lr,
        "train_minutes": round(minutes + (previous["train_minutes"] if previous else 0), 1),
        "continued_from": previous,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {next(model.parameters()).device}",
        "test_accuracy": results,
        "eval_questions": args.eval_n,
    }
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    card["size_mb"] = round(sum(f.stat().st_size for f in Path(args.out).iterdir()) / 2**20, 1)
    (Path(args.out) / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokred.zoo.train", description=__doc__)
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument(
        "--task", action="append", choices=list(MEDIA), help="repeat to train on several, in turn (default: shapes)"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--init", help="continue from this trained checkpoint (its card's sizes; new samples only)")
    parser.add_argument("--hidden", type=int, default=128, help="LLM width")
    parser.add_argument("--layers", type=int, default=4, help="LLM layers")
    parser.add_argument("--vision-hidden", type=int, default=96)
    parser.add_argument("--vision-depth", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--questions", type=int, default=4, help="question/answer turns per image or clip")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the vision-token probe loss")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader processes drawing and preparing samples")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="bf16 autocast on GPUs"
    )
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args(argv)
    args.task = args.task or ["shapes"]
    print(json.dumps(train(args), indent=2))


if __name__ == "__main__":
    main()
