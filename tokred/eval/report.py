"""Write an evaluation as a printed table, JSON (with the run's configuration and versions), CSV and a plot."""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

import tokred
from tokred.eval.runner import Row

COLUMNS = (
    ("task", "task", "{}"),
    ("setting", "setting", "{}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("relative_accuracy", "vs stock", "{:.3f}"),
    ("smallest_accuracy", "on smallest object", "{:.3f}"),
    ("agreement", "agrees with stock", "{:.3f}"),
    ("answer_kl", "answer KL", "{:.3f}"),
    ("target_recall", "target recall", "{:.3f}"),
    ("vision_tokens_kept", "vision tokens kept", "{:.1f}"),
    ("ttft_ms", "TTFT ms/batch", "{:.1f}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("peak_memory_mb", "peak MiB", "{:.1f}"),
    ("kv_bytes", "KV KiB/question", "{:.1f}"),
    ("kv_bits_per_value", "KV bits/value", "{:.2f}"),
)


def table(rows: Sequence[Row]) -> str:
    """A markdown table, one line per (task, setting)."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = getattr(row, key)
            value = value / 1024 if key == "kv_bytes" else value
            cells.append("n/a" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> dict:
    """Versions and machine, recorded with every result."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    return {
        "tokred": tokred.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": device,
        "threads": torch.get_num_threads(),
    }


def write(rows: Sequence[Row], out: str | Path, run: dict) -> dict[str, Path]:
    """``results.json`` (run configuration, versions, rows with each answer), ``results.csv`` (the measurements)
    and ``accuracy.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "png": out / "accuracy.png"}
    data = {"run": run, "environment": environment(), "rows": [r.as_dict() for r in rows]}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as f:
        json_only = ("answers", "target_recall_by_stage")
        writer = csv.DictWriter(
            f, fieldnames=[k for k in rows[0].as_dict() if k not in json_only], extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(r.as_dict() for r in rows)
    plot(rows, paths["png"])
    return paths


PANELS = (
    ("accuracy", "accuracy", (0, 1.02)),
    ("agreement", "agrees with stock", (0, 1.02)),
    ("answer_kl", "answer KL vs stock (nats)", None),
    ("target_recall", "target recall", (0, 1.02)),
)
"""The plot's rows: each measure against the vision tokens kept."""


def plot(rows: Sequence[Row], path: Path) -> None:
    """Each measure (a row of panels) against vision tokens kept, one panel per task, one line per method (its
    ``merge`` variant dashed, in the same colour), stock as a dashed level where the measure has one; one legend
    for the figure, beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in rows))
    methods = [m for m in dict.fromkeys(r.method for r in rows) if m != "stock"]
    bases = list(dict.fromkeys(m.removesuffix(" merge") for m in methods))
    palette = plt.get_cmap("tab20" if len(bases) > 10 else "tab10")
    colour = {base: palette(i % palette.N) for i, base in enumerate(bases)}
    fig, axes = plt.subplots(len(PANELS), len(tasks), figsize=(5.5 * len(tasks), 3.6 * len(PANELS)), squeeze=False)
    for (key, label, ylim), panel in zip(PANELS, axes, strict=True):
        for ax, task in zip(panel, tasks, strict=True):
            task_rows = [r for r in rows if r.task == task]
            for method in dict.fromkeys(r.method for r in task_rows):
                points = sorted(
                    (r.vision_tokens_kept, getattr(r, key))
                    for r in task_rows
                    if r.method == method and getattr(r, key) is not None
                )
                if not points:
                    continue
                if method == "stock":
                    (x, y), name = points[0], f"stock ({points[0][0]:.0f} tokens)"
                    ax.axhline(y, color="black", linestyle="--", linewidth=1)
                    ax.plot([x], [y], "k*", markersize=10, label=name)
                    continue
                xs, ys = zip(*points, strict=True)
                style = "--" if method.endswith(" merge") else "-"
                ax.plot(xs, ys, style, marker="o", color=colour[method.removesuffix(" merge")], label=method)
            ax.set(title=task, xlabel="vision tokens kept per question (mean)", ylabel=label)
            if ylim:
                ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(name, handle)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
