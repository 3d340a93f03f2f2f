"""The `tokred` command: what is supported, tiny checkpoints, and a one-shot stock-vs-patched run."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from tokred.adapters import ADAPTERS
from tokred.config import KV_SCHEMES, PRESETS, WEIGHT_BITS
from tokred.methods import METHODS
from tokred.zoo import FAMILIES, build


def info(args: argparse.Namespace) -> None:
    """Print the support matrix, the methods and the presets."""
    print("families (model class -> recommended recipe):")
    for adapter in ADAPTERS:
        print(f"  {adapter.family:<16} {', '.join(adapter.model_classes):<42} {adapter.recommended}")
    print("methods (name -> stage):")
    for name, method in METHODS.items():
        print(f"  {name:<16} {method.stage}")
    print("presets (name -> recipe):")
    for name, config in PRESETS.items():
        print(f"  {name:<16} {config if config.methods else 'no compression'}")


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


DEFAULT_MODEL = "shapes-qwen2_5_vl"
"""The model of `tokred eval` and `tokred demo` when none is given; until it ships, a random-weight build stands in."""
DEFAULT_RECIPES = ("fastv-50", "fastv-25", "random-25")
MODEL_HELP = f"shipped checkpoint name or a checkpoint directory (default: {DEFAULT_MODEL})"


def default_model() -> tuple[str, str | None]:
    """The model to run when none is given (DEFAULT_MODEL if shipped, else a random zoo build) and a warning to show."""
    from tokred.zoo import available

    if DEFAULT_MODEL in available():
        return DEFAULT_MODEL, None
    return str(build("qwen2_5_vl")), (
        f"no trained checkpoint ({DEFAULT_MODEL}) is shipped in this installation yet, so this runs a random-weight "
        "zoo build: answers and accuracies are noise; kept tokens, KV bytes and timings are real."
    )


def evaluate(args: argparse.Namespace) -> None:
    """Score stock and tokred configurations of a trained checkpoint on local tasks; write table, JSON, CSV, PNG."""
    from transformers.utils.logging import disable_progress_bar

    from tokred.eval import evaluate, grid, table, write
    from tokred.eval.runner import bars
    from tokred.eval.tasks import check, takes
    from tokred.zoo import card, load
    from tokred.zoo.checkpoints import model_type, resolve

    recipes = args.recipes if args.recipes or args.methods else DEFAULT_RECIPES
    settings = grid(args.methods, args.keep, recipes, args.kv, args.weights)
    if args.model is None:
        args.model, warning = default_model()
        if warning:
            print(f"warning: {warning}")
    device = _device(args.device)
    run = {key: value for key, value in vars(args).items() if key != "func"} | {"device": device}
    if args.backend == "lmms-eval":
        from tokred.eval import lmms_run

        tasks = args.tasks or ["tokred_shapes"]
        rows = lmms_run.evaluate(
            args.model, settings, tasks, limit=args.limit, batch_size=args.batch_size, device=device, seed=args.seed
        )
        print(lmms_run.table(rows))
        print(f"json: {lmms_run.write(rows, args.out, run | {'tasks': tasks})}")
        return
    path = resolve(args.model)
    family = model_type(path)
    tasks = args.tasks or (card(path)["tasks"] if (path / "card.json").is_file() else list(takes(family)))
    for task in tasks:
        check(task, family)  # before the weights load
    if not bars():
        disable_progress_bar()  # transformers' weight-loading bar
    model, processor = load(path, attn_implementation="sdpa")
    model.to(device)
    rows = []
    for i, task in enumerate(tasks):
        try:
            rows += evaluate(
                model,
                processor,
                settings,
                [task],
                limit=args.limit,
                batch_size=args.batch_size,
                seed=args.seed,
                frames=args.frames,
                max_pixels=args.max_pixels,
            )
        except Exception as error:
            saved = f"the results of {', '.join(tasks[:i])} are in {args.out}" if i else "nothing was written"
            kind = ValueError if isinstance(error, (ValueError, FileNotFoundError)) else RuntimeError
            raise kind(f"task {task!r} failed ({type(error).__name__}: {error}); {saved}") from error
        paths = write(rows, args.out, run | {"tasks": tasks})  # after each task, so a later failure keeps these
    print(table(rows))
    for name, file in paths.items():
        print(f"{name}: {file}")


def demo(args: argparse.Namespace) -> None:
    """Serve a local Gradio page comparing the stock and the patched model on one image or video and a question."""
    from tokred.demo.app import build_app, launch
    from tokred.zoo import load

    device = _device(args.device)
    warning = None
    if args.model is None:
        args.model, warning = default_model()
    model, processor = load(args.model, attn_implementation="sdpa")
    app = build_app(model.to(device), processor, warning)
    print(f"tokred demo of {args.model} on {launch(app, args.port, args.host)} (Ctrl+C stops it)")
    app.block_thread()


def _device(name: str) -> str:
    """The device for a --device value ("auto": cuda where there is one, else cpu); ValueError for one not here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    here = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count))])
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or auto (here: {here})") from error
    if device.type == "cuda" and (device.index or 0) >= count:
        missing = f"CUDA device {device.index} does not exist" if count else "no CUDA device is available"
        raise ValueError(f"--device {name}: {missing}; devices here: {here}")
    return name


def _keep(text: str) -> float | str:
    """A --keep value: a ratio, or ``auto``."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a keep ratio in (0, 1] or auto, got {text!r}") from None


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

    eval_parser = commands.add_parser("eval", help=evaluate.__doc__, description=evaluate.__doc__)
    eval_parser.add_argument("--model", help=MODEL_HELP)
    eval_parser.add_argument("--methods", nargs="+", default=[], help="methods to run at each --keep ratio")
    eval_parser.add_argument(
        "--keep", nargs="+", type=_keep, default=[], help="keep ratios for --methods, or auto (sized per input)"
    )
    eval_parser.add_argument(
        "--recipes",
        nargs="+",
        default=[],
        help=f"presets or recipe text, e.g. fastv:layer=3:keep=0.2 (without --methods: {' '.join(DEFAULT_RECIPES)})",
    )
    eval_parser.add_argument(
        "--kv", default="none", help=f"KV-cache scheme for every setting but stock ({', '.join(KV_SCHEMES)})"
    )
    eval_parser.add_argument(
        "--weights", default="none", help=f"weight scheme for every setting but stock ({', '.join(WEIGHT_BITS)})"
    )
    eval_parser.add_argument(
        "--backend",
        choices=["tokred", "lmms-eval"],
        default="tokred",
        help="tokred's runner on local tasks, or lmms-eval (its tasks, e.g. mme videomme, or tokred_shapes)",
    )
    eval_parser.add_argument(
        "--tasks",
        nargs="+",
        help="tasks: shapes, motion, or a local dataset's directory holding a questions.jsonl (default: the "
        "checkpoint card's, else the local tasks its family takes; lmms-eval: tokred_shapes)",
    )
    eval_parser.add_argument(
        "--frames", type=int, default=16, help="frames sampled evenly from each video of a local dataset"
    )
    eval_parser.add_argument("--max-pixels", type=int, help="resize a local dataset's video frames to at most this")
    eval_parser.add_argument("--limit", type=int, help="questions per task (default 200; a local dataset: all)")
    eval_parser.add_argument("--batch-size", type=int, default=8)
    eval_parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    eval_parser.add_argument("--seed", type=int, default=0, help="data seed of the local tasks")
    eval_parser.add_argument("--out", default="results/eval", help="directory for results.json/.csv and accuracy.png")
    eval_parser.set_defaults(func=evaluate)

    demo_parser = commands.add_parser("demo", help=demo.__doc__, description=demo.__doc__)
    demo_parser.add_argument("--model", help=MODEL_HELP)
    demo_parser.add_argument("--port", type=int, default=7860)
    demo_parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    demo_parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    demo_parser.set_defaults(func=demo)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: say what was wrong, no traceback
        parser.exit(2, f"tokred {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
