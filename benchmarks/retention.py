"""Accuracy vs retention: one trained checkpoint, stock and each method at several keep ratios.

    python benchmarks/retention.py shapes-llava [--task shapes] [--n 200] [--keep 0.5 0.25 0.1]

CHECKPOINT is a shipped name or a directory; tasks default to those on its card. Same test questions for
every configuration; prints a markdown table with the accuracy overall and on the questions about each
scene's smallest object (ShapesVQA), and the vision tokens kept (mean per sample, from tokred.stats), and
writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tokred
from tokred.zoo import card, load
from tokred.zoo.train import graded

METHODS = {"random": tokred.Random, "fastv": lambda keep: tokred.FastV(layer=2, keep=keep)}


class KeptTokens:
    """Sum of vision tokens per sample after the last stage, over the prefills (calls that carry media)."""

    def __init__(self, model) -> None:
        self.model, self.total, self.samples = model, 0, 0

    def __call__(self, module, args, kwargs, output) -> None:
        media = [kwargs.get(k) for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")]
        counts = list(tokred.stats(self.model).vision_tokens.values())
        if counts and any(isinstance(m, torch.Tensor) or m for m in media if m is not None):
            self.total += sum(counts[-1])
            self.samples += len(counts[-1])


def measure(model, processor, task: str, n: int, seed: int, config) -> dict:
    with tokred.patched(model, config):
        kept = KeptTokens(model)
        hook = model.register_forward_hook(kept, with_kwargs=True)
        try:
            results = graded(model, processor, task, n, seed)
        finally:
            hook.remove()
    small = [ok for record, ok in results if record.get("about_smallest")]
    return {
        "accuracy": sum(ok for _, ok in results) / n,
        "smallest_accuracy": sum(small) / len(small) if small else None,
        "vision_tokens": kept.total / max(kept.samples, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="shipped name (tokred.zoo.available()) or checkpoint directory")
    parser.add_argument("--task", action="append", help="repeat for several (default: the card's tasks)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--out", default="results/retention.json")
    args = parser.parse_args()
    model, processor = load(args.checkpoint, attn_implementation="sdpa")
    stated = card(args.checkpoint)
    configs = {"stock": ("none", 1.0)}
    configs |= {
        f"{name} keep {keep}": (method(keep=keep), keep) for name, method in METHODS.items() for keep in args.keep
    }
    rows = []
    for task in args.task or stated["tasks"]:
        for name, (config, keep) in configs.items():
            row = {"task": task, "config": name, "keep": keep}
            rows.append(row | measure(model, processor, task, args.n, stated["seed"], config))
    print("| task | config | accuracy | on the smallest object | vision tokens kept (mean per sample) |")
    print("|---|---|---|---|---|")
    for row in rows:
        small = "–" if row["smallest_accuracy"] is None else f"{row['smallest_accuracy']:.3f}"
        print(f"| {row['task']} | {row['config']} | {row['accuracy']:.3f} | {small} | {row['vision_tokens']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(args.checkpoint), "n": args.n, "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
