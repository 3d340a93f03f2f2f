"""The `tokred` command: what is supported, tiny checkpoints, and a one-shot stock-vs-patched run."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from tokred.adapters import ADAPTERS
from tokred.config import PRESETS, RECOMMENDED
from tokred.methods import METHODS
from tokred.zoo import FAMILIES, build


def info(args: argparse.Namespace) -> None:
    """Print the support matrix, the methods and the presets."""
    print("families (model class -> recommended recipe):")
    for adapter in ADAPTERS:
        print(f"  {adapter.family:<16} {', '.join(adapter.model_classes):<42} {RECOMMENDED[adapter.family]}")
    print("methods (name -> stage):")
    for name, method in METHODS.items():
        print(f"  {name:<16} {method.stage}")
    print("presets:")
    for name, config in PRESETS.items():
        print(f"  {name:<16} {', '.join(map(repr, config.prune)) or 'no compression'}")


def zoo(args: argparse.Namespace) -> None:
    """Build a tiny offline checkpoint and print where it went."""
    print(build(args.family, args.out, seed=args.seed))


def run(args: argparse.Namespace) -> None:
    """Answer one synthetic image question with the stock and the patched tiny model, side by side."""
    import numpy as np
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import tokred

    path = build(args.family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour is the star?"}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")

    def answer() -> tuple[str, float]:
        start = time.perf_counter()
        with torch.inference_mode():
            ids = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        elapsed = time.perf_counter() - start
        return processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True), elapsed

    stock, stock_s = answer()
    with tokred.patched(model, args.recipe):
        patched, patched_s = answer()
        stats = tokred.stats(model)
    print(f"checkpoint: {path} (random weights: answers are noise, the mechanics are real)")
    print(f"stock   answer {stock!r} in {stock_s * 1e3:.0f} ms")
    print(f"patched answer {patched!r} in {patched_s * 1e3:.0f} ms  ({args.recipe or 'recommended recipe'})")
    print(stats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokred", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help=info.__doc__).set_defaults(func=info)

    zoo_parser = commands.add_parser("zoo", help=zoo.__doc__)
    zoo_parser.add_argument("family", choices=FAMILIES)
    zoo_parser.add_argument("--out", help="directory (default: the tokred cache)")
    zoo_parser.add_argument("--seed", type=int, default=0)
    zoo_parser.set_defaults(func=zoo)

    run_parser = commands.add_parser("run", help=run.__doc__)
    run_parser.add_argument("--family", choices=FAMILIES, default="qwen2_5_vl")
    run_parser.add_argument("--recipe", choices=list(PRESETS), help="a preset (default: the family's recommended)")
    run_parser.add_argument("--max-new-tokens", type=int, default=8)
    run_parser.set_defaults(func=run)

    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
