"""Train a small VLM of a real architecture from scratch on tokred's synthetic benchmarks.

    python -m tokred.zoo.train --family qwen2_5_vl --task shapes --task motion --out DIR

Samples are drawn on the fly from `tokred.zoo.datasets.sample` (deterministic by seed and index), the
loss covers the answer tokens only, and the run stops at `--steps` or `--minutes`, whichever comes
first. The result is saved with `save_pretrained` plus a model card with the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokred.zoo import build
from tokred.zoo.datasets import sample

MEDIA = {"shapes": "image", "motion": "video"}


def chat(processor, kind: str, question: str, answer: str | None = None) -> str:
    """The family's chat text for one question, with the answer appended for training."""
    content = [{"type": MEDIA[kind]}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return text if answer is None else text + answer + processor.tokenizer.eos_token


def batch_inputs(processor, kind: str, items: list[tuple[dict, object]], train: bool) -> dict:
    """Processor inputs for (record, media) pairs; with `train`, labels on the answer tokens only."""
    texts = [chat(processor, kind, r["question"], r["answer"] if train else None) for r, _ in items]
    media = [m for _, m in items]
    key = "images" if MEDIA[kind] == "image" else "videos"
    inputs = processor(text=texts, **{key: media}, return_tensors="pt", padding=True)
    if train:
        labels = torch.full_like(inputs["input_ids"], -100)
        for b, (record, _) in enumerate(items):
            answer = processor.tokenizer(record["answer"] + processor.tokenizer.eos_token, add_special_tokens=False)
            n = len(answer["input_ids"])
            labels[b, -n:] = inputs["input_ids"][b, -n:]  # left padding: the answer ends every row
        inputs["labels"] = labels
    return inputs


def accuracy(model, processor, kind: str, n: int, seed: int, batch_size: int) -> float:
    """Exact-match accuracy of greedy answers on the first `n` test questions."""
    correct = 0
    for start in range(0, n, batch_size):
        items = [sample(kind, "test", i, seed=seed) for i in range(start, min(n, start + batch_size))]
        inputs = batch_inputs(processor, kind, items, train=False)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(a.strip() == r["answer"] for a, (r, _) in zip(answers, items, strict=True))
    return correct / n


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    sizes = {
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 32,
        "num_key_value_heads": max(1, args.hidden // 64),
    }
    path = build(args.family, Path(args.out) / "init", seed=args.seed, **sizes)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").train()
    processor = AutoProcessor.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    start, step, index = time.monotonic(), 0, 0
    while step < args.steps and time.monotonic() - start < args.minutes * 60:
        kind = args.task[step % len(args.task)]
        items = [sample(kind, "train", index + i, seed=args.seed) for i in range(args.batch_size)]
        index += args.batch_size
        loss = model(**batch_inputs(processor, kind, items, train=True)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        step += 1
        if step % args.log_every == 0:
            print(f"step {step} {kind} loss {loss.item():.3f} ({time.monotonic() - start:.0f} s)", flush=True)
    minutes = (time.monotonic() - start) / 60
    model.eval()
    results = {k: accuracy(model, processor, k, args.eval_n, args.seed, args.batch_size) for k in args.task}
    card = {
        "family": args.family,
        "tasks": args.task,
        "sizes": sizes,
        "seed": args.seed,
        "steps": step,
        "samples_seen": index,
        "train_minutes": round(minutes, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {next(model.parameters()).device}",
        "test_accuracy": results,
        "eval_questions": args.eval_n,
    }
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    (Path(args.out) / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokred.zoo.train", description=__doc__)
    parser.add_argument("--family", default="qwen2_5_vl")
    parser.add_argument("--task", action="append", choices=list(MEDIA), help="repeat for several (default: shapes)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=20)
    args = parser.parse_args(argv)
    args.task = args.task or ["shapes"]
    print(json.dumps(train(args), indent=2))


if __name__ == "__main__":
    main()
