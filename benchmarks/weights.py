"""Per-layer weight bits (LUQ's LayerBits) against uniform bits on the trained checkpoints: bytes, predicted error and
accuracy, in one run per checkpoint.

For each shipped checkpoint (default: every one, `tokred.zoo.available()`), loaded in ``--dtype``, the LLM is
calibrated once (`tokred.weights.calibrate.calibrate`: ``--calib-n`` ShapesVQA train samples, widths 2/3/4/8 at
``--group``; saved as ``<out>/calibration-<name>.json``) and `tokred.eval.evaluate` runs, on the same questions of
each task the checkpoint's card covers (ShapesVQA and/or MotionVQA): the stock model, `UniformBits` at 4, 3 and 2
bits, and `LayerBits` (candidates 2/3/4/8/16, given that calibration) at an average of 3.0 bits (the same code bits
as uniform 3-bit) and 2.5 bits. Per setting: the parameter-weighted mean code width of the LLM's linear layers, the
bytes those layers and the whole model hold while patched (packed codes, float16 scales and zeros, biases; every
parameter and buffer), the calibration's predicted error of the bit map (`tokred.weights.allocate.predicted_error`,
what LayerBits minimises; 0 for stock), and per task accuracy, agreement with stock and answer KL. ``--group``
defaults to the largest of 64, 32 and 16 that divides every LLM linear layer's input width.

Results go to ``<out>/weights.json`` and ``weights.md``: one table per checkpoint, and whether LayerBits beat
uniform 3-bit (and, at 2.5 bits, uniform 2-bit), a task's accuracy difference counting only where a sign test over
the questions just one of the two answered right puts it beyond chance; ``summary.md``, one table for every
checkpoint (the README's). ``<out>/bitmap-<name>.png`` shows each LayerBits map (transformer block x projection,
colour = bits) beside the calibration's output entropy on the vision tokens, the signal LUQ allocates by.

    python benchmarks/weights.py --threads 1                                     # every checkpoint, 200 questions
    python benchmarks/weights.py --checkpoints shapes-llava --limit 50 --threads 1

No timings: on the CPU `QuantLinear` runs the torch reference (dequantize, then matmul), so time here says nothing
of the Triton kernels; `weights_kernels.py` times those on a GPU.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch
from prefill import finish, start
from torch import nn

import tokred
from tokred.eval import Setting, evaluate, questions
from tokred.eval.report import environment
from tokred.kv.cache import FULL
from tokred.methods.layerbits import WIDTHS as CANDIDATES
from tokred.weights.allocate import predicted_error, uniform
from tokred.weights.calibrate import Calibration, calibrate, llm_linears
from tokred.weights.quant import WEIGHT_WIDTHS
from tokred.zoo import available, card, load

UNIFORM = (4, 3, 2)
AVERAGES = (3.0, 2.5)  # LayerBits budgets: uniform 3-bit's code bits, and between 3 and 2 to show the curve
COMPARED = (("LayerBits avg 3.0", "uniform 3-bit"), ("LayerBits avg 2.5", "uniform 2-bit"))
"""The verdicts: LayerBits at uniform 3-bit's code bits, and at 2.5 against the uniform width below it."""
MEASURES = {"accuracy": "accuracy", "agreement": "agreement", "answer_kl": "answer KL"}  # Row field -> column
GROUPS = (64, 32, 16)
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
SHORT = {"bfloat16": "bf16", "float32": "fp32"}
MB = 1e6


def default_group(layers: dict[str, nn.Linear]) -> int:
    """The largest of `GROUPS` that divides every layer's input width."""
    for group in GROUPS:
        if all(layer.in_features % group == 0 for layer in layers.values()):
            return group
    widths = sorted({layer.in_features for layer in layers.values()})
    raise ValueError(f"none of {GROUPS} divides every LLM linear layer's input width ({widths}); pass --group")


def schemes(group: int, calibration: Path) -> list[tuple[str, tokred.WeightScheme]]:
    """The quantized settings: uniform widths, then LayerBits at each average, by display name."""
    runs: list[tuple[str, tokred.WeightScheme]] = [
        (f"uniform {b}-bit", tokred.UniformBits(bits=b, group=group)) for b in UNIFORM
    ]
    runs += [
        (
            f"LayerBits avg {a}",
            tokred.LayerBits(avg_bits=a, group=group, calibration=str(calibration), candidates=CANDIDATES),
        )
        for a in AVERAGES
    ]
    return runs


def held_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer the module holds (a tied tensor once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def footprint(model: nn.Module, names: list[str], bit_map: dict[str, int]) -> dict[str, float]:
    """The mean code width over the layers `names` (parameter-weighted, 16 for those left whole), the bytes those
    layers and the whole model hold as the model is now, and the layer count at each width."""
    layers = {name: model.get_submodule(name) for name in names}
    params = {name: layer.in_features * layer.out_features for name, layer in layers.items()}
    mean = sum(params[n] * bit_map[n] for n in names) / sum(params.values())
    counts = {str(b): sum(bit_map[n] == b for n in names) for b in CANDIDATES}
    return {
        "avg_bits": mean,
        "llm_linear_bytes": sum(held_bytes(layer) for layer in layers.values()),
        "model_bytes": held_bytes(model),
        "layers_at_bits": counts,
    }


def checkpoint(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One checkpoint: calibrate, then every setting's bit map, bytes, predicted error and per-task eval."""
    model, processor = load(name, dtype=getattr(torch, args.dtype))
    tasks = card(name)["tasks"]
    layers = llm_linears(model)
    names = list(layers)
    group = args.group or default_group(layers)
    path = args.out / f"calibration-{name}.json"
    calibration = calibrate(model, processor, n=args.calib_n, group=group, candidates=WEIGHT_WIDTHS)
    calibration.to_json(path)
    stock = f"{SHORT.get(args.dtype, args.dtype)} stock"
    whole = uniform(names, FULL)
    entries = {stock: {"bit_map": whole} | footprint(model, names, whole)}
    settings = [Setting(stock, "none")]
    for label, scheme in schemes(group, path):
        bit_map = scheme.bit_map(model)
        config = tokred.Config(weights=scheme)
        with tokred.patched(model, config):
            entries[label] = {"recipe": str(config), "bit_map": bit_map} | footprint(model, names, bit_map)
        settings.append(Setting(label, config, scheme.name))
    for entry in entries.values():
        entry["predicted_error"] = predicted_error(calibration, entry["bit_map"])
        entry["tasks"] = {}
    truth = {task: [q.answer for q in questions(task, args.limit)] for task in tasks}
    for row in evaluate(model, processor, settings, tasks, limit=args.limit, batch_size=args.batch):
        measures = {k: getattr(row, k) for k in (*MEASURES, "answers")}
        correct = [a == b for a, b in zip(row.answers, truth[row.task], strict=True)]
        entries[row.setting]["tasks"][row.task] = measures | {"correct": correct}
    plot(
        calibration,
        {label: entries[label]["bit_map"] for label in entries if label.startswith("LayerBits")},
        args.out / f"bitmap-{name}.png",
        name,
    )
    return {"group": group, "calibration": str(path), "calib_n": args.calib_n, "tasks": tasks, "settings": entries}


def table(result: dict[str, Any]) -> str:
    """Markdown: per setting, its bits, bytes, predicted error and per task accuracy, agreement with stock and
    answer KL (stock to it, of the first answer token; nats)."""
    tasks = result["tasks"]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}" if value >= 1e-3 or value == 0 else f"{value:.1e}"

    head = ["setting", "avg bits", "LLM-linear MB", "model MB", "predicted error"]
    head += [f"{label} {t}" for label in MEASURES.values() for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label, e in result["settings"].items():
        cells = [label, f"{e['avg_bits']:.2f}", f"{e['llm_linear_bytes'] / MB:.3f}", f"{e['model_bytes'] / MB:.3f}"]
        cells.append(f"{e['predicted_error']:.4f}")
        cells += [cell(e["tasks"][t][m]) for m in MEASURES for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(result: dict[str, Any], ours: str, theirs: str) -> str:
    """Whether the setting `ours` beat `theirs`: per task, the questions only one of them answered right, a
    difference counted only where a two-sided sign test puts it beyond chance (|won - lost| > 1.96 sqrt(won +
    lost)); with the bytes, predicted errors and answer KLs behind it."""
    a, b = result["settings"][ours], result["settings"][theirs]
    if a["bit_map"] == b["bit_map"]:
        return f"{ours} picks {theirs}'s bit map itself, so the two are the same model."
    parts, signs = [], set()
    for t in result["tasks"]:
        mine, other = a["tasks"][t], b["tasks"][t]
        won = sum(x and not y for x, y in zip(mine["correct"], other["correct"], strict=True))
        lost = sum(y and not x for x, y in zip(mine["correct"], other["correct"], strict=True))
        clear = abs(won - lost) > 1.96 * (won + lost) ** 0.5
        signs.add((won > lost) - (won < lost) if clear else 0)
        parts.append(
            f"{t}: accuracy {100 * (mine['accuracy'] - other['accuracy']):+.1f} points (won {won}, lost {lost} "
            f"questions{'' if clear else ': within chance'}), answer KL {mine['answer_kl']:.4f} vs "
            f"{other['answer_kl']:.4f}"
        )
    outcome = {1: "beats", -1: "trails"}.get(sum(signs), "is mixed against") if signs - {0} else "ties"
    return (
        f"{ours} {outcome} {theirs} at {a['llm_linear_bytes'] / b['llm_linear_bytes']:.3f}x its LLM-linear bytes "
        f"(predicted error {a['predicted_error']:.4f} vs {b['predicted_error']:.4f}); {'; '.join(parts)}."
    )


def summary(report: dict[str, Any]) -> str:
    """One compact table for every checkpoint (the README's): per setting, its mean code width and LLM-linear MB
    (each a range where checkpoints differ) and per checkpoint and task accuracy in % with agreement with stock."""

    def spread(values: list[str]) -> str:
        ordered = sorted(set(values), key=float)
        return "–".join(dict.fromkeys((ordered[0], ordered[-1])))

    runs = report["checkpoints"]
    columns = [(name, task) for name, result in runs.items() for task in result["tasks"]]
    head = ["setting", "avg bits", "LLM-linear MB", *(f"{name} {task}" for name, task in columns)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for label in next(iter(runs.values()))["settings"]:
        entries = {name: result["settings"][label] for name, result in runs.items()}
        bits = spread([f"{e['avg_bits']:.2f}" for e in entries.values()])
        cells = [label, bits, spread([f"{e['llm_linear_bytes'] / MB:.3f}" for e in entries.values()])]
        for name, task in columns:
            measured = entries[name]["tasks"][task]
            agreement = "–" if measured["agreement"] is None else f"{measured['agreement']:.2f}"
            cells.append(f"{100 * measured['accuracy']:.1f} ({agreement})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell_of(name: str) -> tuple[int, str]:
    """(transformer block, projection) of an LLM linear layer's qualified name: `...layers.3.mlp.gate_proj` ->
    (3, "gate")."""
    found = re.search(r"\.layers\.(\d+)\..*?(\w+?)(?:_proj)?$", name)
    if not found:
        raise ValueError(f"{name!r} is not a linear layer inside a numbered transformer block (`.layers.N.`)")
    return int(found[1]), found[2]


def plot(calibration: Calibration, maps: dict[str, dict[str, int]], path: Path, title: str) -> None:
    """One panel per bit map (block x projection, colour = bits, each cell labelled) and one of each layer's
    output entropy on the vision tokens."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cells = {name: cell_of(name) for name in calibration.layers}
    blocks = sorted({b for b, _ in cells.values()})
    found = {p for _, p in cells.values()}
    projections = [p for p in PROJECTIONS if p in found] + sorted(found - set(PROJECTIONS))

    def grid(values: dict[str, float]) -> torch.Tensor:
        out = torch.full((len(projections), len(blocks)), float("nan"))
        for name, v in values.items():
            block, projection = cells[name]
            out[projections.index(projection), blocks.index(block)] = v
        return out

    colours = ListedColormap(["#b2182b", "#ef8a62", "#fddbc7", "#67a9cf", "#2166ac"][: len(CANDIDATES)])
    norm = BoundaryNorm([-0.5 + i for i in range(len(CANDIDATES) + 1)], colours.N)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1) + 1, 0.45 * len(projections) + 1.6))
    for ax, (label, bit_map) in zip(axes[:-1], maps.items(), strict=True):
        ax.imshow(grid({n: CANDIDATES.index(b) for n, b in bit_map.items()}), cmap=colours, norm=norm, aspect="auto")
        for name, b in bit_map.items():
            block, projection = cells[name]
            ax.text(blocks.index(block), projections.index(projection), b, ha="center", va="center", fontsize=8)
        ax.set_title(f"{label} ({predicted_error(calibration, bit_map):.4f})", fontsize=9)
    entropy = axes[-1].imshow(
        grid({n: s.entropy for n, s in calibration.layers.items()}), cmap="viridis", aspect="auto"
    )
    fig.colorbar(entropy, ax=axes[-1], label="bits")
    axes[-1].set_title("output entropy on vision tokens", fontsize=9)
    for ax in axes:
        ax.set_xticks(range(len(blocks)), blocks)
        ax.set_yticks(range(len(projections)), projections)
        ax.set_xlabel("transformer block")
    fig.suptitle(f"{title}: bits per LLM linear layer (predicted error), group {calibration.group}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=available(), help="shipped names or directories")
    parser.add_argument("--limit", type=int, default=200, help="test questions per task")
    parser.add_argument("--group", type=int, help="input channels per scale and zero (default: see above)")
    parser.add_argument("--calib-n", type=int, default=32, help="ShapesVQA train samples to calibrate on")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(SHORT), help="the model runs and is counted in")
    parser.add_argument("--batch", type=int, default=8, help="questions per generate() batch")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 steadies a busy machine)")
    parser.add_argument("--out", type=Path, default=Path("results/weights"))
    args = parser.parse_args(argv)
    began, load_before = start(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(), "limit": args.limit, "dtype": args.dtype, "checkpoints": {}}
    sections = []
    for name in args.checkpoints:
        result = checkpoint(name, args)
        report["checkpoints"][name] = result
        head = (
            f"### {name}: group {result['group']}, calibrated on {args.calib_n} ShapesVQA samples, "
            f"{args.limit} questions a task"
        )
        sections += [head, table(result), *(verdict(result, *pair) for pair in COMPARED)]
    sections.append(
        f"avg bits: parameter-weighted mean code width of the LLM's linear layers (16: left in {args.dtype}); MB: "
        "what those layers and the whole model hold while patched (codes, float16 scales and zeros per group, "
        "biases; the model's every parameter and buffer). Predicted error: the calibration's "
        "parameter- and entropy-weighted relative output error of the map, what LayerBits minimises."
    )
    (args.out / "summary.md").write_text(summary(report) + "\n")
    return finish(report, sections, args.out / "weights", began, load_before)


if __name__ == "__main__":
    main()
