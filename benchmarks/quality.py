"""Quality vs keep for every token-reducing method, with and without ``merge=True``, on the trained checkpoints,
with the vision-encoder and LLM-prefill time of each setting over stock, in one run.

For each checkpoint (default: every shipped one) and each of its tasks, `tokred.eval.evaluate` runs stock and
every registered token reducer at each keep ratio (and, for the selecting ones, the same with ``merge=True``) on
the same questions: accuracy, agreement with stock, answer KL and target recall. Then `prefill.measure` times one
batch of the task's first questions through every setting, interleaved (warm-up, median of ``--repeats`` rounds):
the vision encoder and the LLM prefill (tokred's own cut and signals included), as ratios over stock. Results go
to ``<out>/quality.json``, ``quality.md``, ``summary.md`` (one compact table: accuracy per method and keep on
every checkpoint, time ratios at the middle keep), ``retention.md`` (random and fastv with accuracy, agreement,
answer KL and target recall) and one plot per checkpoint, ``quality-<name>.png`` (the eval
report's panels).

    python benchmarks/quality.py                        # all shipped checkpoints, 200 questions, keep 0.5 0.25 0.1
    python benchmarks/quality.py --checkpoints shapes-llava --limit 100 --keeps 0.25

On CPU only ratios are results (absolute times are not comparable figures).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from prefill import STOCK, measure, start, summarise

import tokred
from tokred.eval import evaluate, grid, questions
from tokred.eval.report import environment, plot, table
from tokred.zoo import available, card, load
from tokred.zoo.prompts import chat, media_inputs


def settings(keeps: list[float]):
    """Stock, every reducer at every keep, and every selecting one again with merge=True."""
    methods = sorted(n for n, m in tokred.METHODS.items() if issubclass(m, tokred.TokenReducer))
    selecting = [m for m in methods if not issubclass(tokred.METHODS[m], tokred.TokenMerger)]
    return grid(methods, keeps, [f"{m}:keep={k}:merge=True" for m in selecting for k in keeps])


def timing_inputs(processor, task: str, n: int) -> dict:
    """One batch: the task's first `n` test questions as the eval feeds them."""
    batch = questions(task, n)
    texts = [chat(processor, task, q.record["question"]) for q in batch]
    return media_inputs(processor, task, texts, [q.media for q in batch])


def checkpoint(name: str, args: argparse.Namespace) -> tuple[list, dict]:
    """The eval rows of one checkpoint (merge variants labelled ``<method> merge``) and, per task and setting,
    the vision-encoder and LLM-prefill time over stock."""
    model, processor = load(name)
    columns = settings(args.keeps)
    tasks = card(name)["tasks"]
    rows = evaluate(model, processor, columns, tasks, limit=args.limit)
    for row in rows:
        if ":merge=True" in row.setting:
            row.method += " merge"
    timing: dict = {}
    for task in tasks:
        names = [STOCK, *(str(s.config) for s in columns[1:])]
        results = measure(model, timing_inputs(processor, task, args.batch), names, args.repeats, warmup=1)
        summary = summarise(results, model.config.get_text_config().num_hidden_layers)
        timing[task] = {
            s.name: {k: summary[n]["ratio"][k] for k in ("vision", "llm")} for s, n in zip(columns, names, strict=True)
        }
    return rows, timing


def markdown(rows, timing: dict) -> str:
    """The eval table with the two time ratios appended."""
    lines = table(rows).splitlines()
    lines[0] += " vision time / stock | LLM prefill / stock |"
    lines[1] += "---|---|"
    for i, row in enumerate(rows):
        ratio = timing[row.task][row.setting]
        lines[i + 2] += f" {ratio['vision']:.2f} | {ratio['llm']:.2f} |"
    return "\n".join(lines)


def summary(report: dict) -> str:
    """One compact table for all checkpoints: per method (merge variants apart), accuracy in % at each keep and
    the LLM-prefill and vision-encoder time over stock at the middle keep; stock first, then by name."""
    names, keeps = list(report["checkpoints"]), report["keeps"]
    middle = keeps[len(keeps) // 2]
    cells: dict[str, dict[str, dict]] = {}
    for name, rows in report["checkpoints"].items():
        for row in rows:
            cells.setdefault(row["method"], {}).setdefault(name, {})[row["keep"]] = row
    header = "| method | " + " | ".join(f"{n} @ {' / '.join(map(str, keeps))}" for n in names)
    header += " | " + " | ".join(f"{n} prefill, vision / stock @ {middle}" for n in names) + " |"
    lines = [header, "|---" * (1 + 2 * len(names)) + "|"]
    for method in sorted(cells, key=lambda m: (m != "stock", m)):
        runs = cells[method]
        accuracy = [
            " / ".join(f"{100 * runs[n][k]['accuracy']:.1f}" if k in runs[n] else "–" for k in keeps)
            if method != "stock"
            else f"{100 * next(iter(runs[n].values()))['accuracy']:.1f}"
            for n in names
        ]
        timing = []
        for n in names:
            row = runs[n].get(middle) if method != "stock" else None
            timing.append(f"{row['time_ratio']['llm']:.2f}, {row['time_ratio']['vision']:.2f}" if row else "–")
        lines.append(f"| {method} | " + " | ".join(accuracy) + " | " + " | ".join(timing) + " |")
    return "\n".join(lines)


RETAINED = ("random", "fastv")
"""The methods of the retention table: the content-blind baseline and the first attention-guided one."""


def retention(report: dict) -> str:
    """Per checkpoint, `RETAINED` method and keep: accuracy (%), agreement with stock, answer KL (nats) and
    target recall, the measures that separate methods where accuracy moves little."""
    lines = [
        "| checkpoint | method | keep | accuracy | agreement | answer KL | target recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rows in report["checkpoints"].items():
        for row in sorted(rows, key=lambda r: (r["method"] != "stock", r["method"], -(r["keep"] or 1))):
            if row["method"] != "stock" and row["method"] not in RETAINED:
                continue
            measures = [row[k] for k in ("agreement", "answer_kl", "target_recall")]
            cells = ["–" if v is None else f"{v:.3f}" for v in measures]
            keep = "–" if row["method"] == "stock" else f"{row['keep']}"
            lines.append(
                f"| {name} | {row['method']} | {keep} | {100 * row['accuracy']:.1f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=available(), help="shipped names or directories")
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.5, 0.25, 0.1])
    parser.add_argument("--limit", type=int, default=200, help="test questions per task")
    parser.add_argument("--batch", type=int, default=8, help="questions in the timed batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--out", type=Path, default=Path("results/quality"))
    args = parser.parse_args(argv)
    began, load_before = start()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "keeps": args.keeps, "limit": args.limit, "checkpoints": {}}
    sections = []
    for name in args.checkpoints:
        rows, timing = checkpoint(name, args)
        report["checkpoints"][name] = [r.as_dict() | {"time_ratio": timing[r.task][r.setting]} for r in rows]
        sections.append(f"### {name}\n\n{markdown(rows, timing)}")
        plot(rows, args.out / f"quality-{name}.png")
    report["load_average"] = {"start": load_before, "end": os.getloadavg()}
    report["runtime_s"] = time.perf_counter() - began
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "quality.md").write_text("\n\n".join(sections) + "\n")
    (args.out / "summary.md").write_text(summary(report) + "\n")
    (args.out / "retention.md").write_text(retention(report) + "\n")
    print("\n\n".join(sections) + "\n\n" + summary(report) + "\n\n" + retention(report))
    print(
        f"wrote {args.out}/quality.json, quality.md, summary.md, retention.md, quality-<checkpoint>.png "
        f"({report['runtime_s']:.0f} s)"
    )
    return report


if __name__ == "__main__":
    main()
