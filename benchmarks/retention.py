"""Accuracy vs retention: one trained checkpoint, stock and each method at several keep ratios.

    python benchmarks/retention.py CHECKPOINT [--task shapes] [--n 200] [--keep 0.5 0.25 0.1]

Same test questions for every configuration; prints a markdown table with the vision tokens kept (mean
per sample, from tokred.stats) and writes JSON next to it (--out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import tokred
from tokred.zoo.train import accuracy

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


def measure(model, processor, task: str, n: int, config) -> dict:
    with tokred.patched(model, config):
        kept = KeptTokens(model)
        hook = model.register_forward_hook(kept, with_kwargs=True)
        try:
            acc = accuracy(model, processor, task, n, seed=0, batch_size=16)
        finally:
            hook.remove()
    return {"accuracy": acc, "vision_tokens": kept.total / max(kept.samples, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--task", default="shapes")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--out", default="results/retention.json")
    args = parser.parse_args()
    model = AutoModelForImageTextToText.from_pretrained(args.checkpoint, attn_implementation="sdpa").eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    rows = {"stock (keep 1.0)": measure(model, processor, args.task, args.n, "none")}
    for name, method in METHODS.items():
        for keep in args.keep:
            rows[f"{name} keep {keep}"] = measure(model, processor, args.task, args.n, method(keep=keep))
    print("| config | accuracy | vision tokens kept (mean per sample) |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['accuracy']:.3f} | {row['vision_tokens']:.1f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": args.checkpoint, "task": args.task, "n": args.n, "torch": torch.__version__}
    Path(args.out).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
