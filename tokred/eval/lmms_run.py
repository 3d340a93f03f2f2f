"""`tokred eval --backend lmms-eval`: lmms-eval tasks (standard benchmarks or tokred's own) for a grid of settings.

Each setting runs lmms-eval's ``simple_evaluate`` with the ``tokred`` plugin model, so the numbers are lmms-eval's.
Before anything loads, every task is checked: unknown names get the closest known ones, and a task whose
Hugging Face dataset is not available here (offline, not in the datasets cache) says which dataset and where
it looked, instead of lmms-eval's retries and a logged traceback.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokred.adapters import ADAPTERS
from tokred.eval.lmms_tasks import include_path
from tokred.eval.runner import Setting
from tokred.eval.tasks import DEFAULT_QUESTIONS
from tokred.zoo.checkpoints import model_type, resolve

BASE = {adapter.family: adapter.lmms_base for adapter in ADAPTERS}
"""Checkpoint model_type -> the lmms-eval model class the plugin wraps (each adapter's `lmms_base`)."""


def task_manager(limit: int | None, seed: int):
    """lmms-eval's task index with tokred's local task YAMLs included."""
    from lmms_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path(limit or DEFAULT_QUESTIONS, seed)))


def check_tasks(manager, tasks: Sequence[str]) -> None:
    """Unknown task names and tasks whose data is not available raise ValueError / FileNotFoundError."""
    import datasets

    known = manager.all_tasks
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=5)
            hint = f"; closest: {', '.join(close)}" if close else ""
            raise ValueError(f"unknown lmms-eval task {task!r}{hint} (`python -m lmms_eval tasks` lists them)")
        if manager.task_index[task]["type"] != "task":
            continue  # groups and tags: their member tasks are checked by lmms-eval itself
        config = manager._get_config(task)
        source = config.get("dataset_path")
        if source in ("json", "csv", "parquet", "text") or (source and Path(source).exists()):
            continue
        try:
            datasets.load_dataset_builder(source, name=config.get("dataset_name"))
        except Exception as error:  # offline misses surface as ConnectionError, FileNotFoundError, ...
            where = datasets.config.HF_DATASETS_CACHE
            offline = " (offline)" if os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") else ""
            raise FileNotFoundError(
                f"lmms-eval task {task!r} reads the Hugging Face dataset {source!r}, which is not available "
                f"here{offline}: looked in HF_DATASETS_CACHE={where} ({type(error).__name__}). Download it where "
                "the hub is reachable and point HF_DATASETS_CACHE at it."
            ) from error


MIN_PIXELS = 28 * 28
"""Qwen bases: media are never upscaled, so lmms-eval's model sees the sizes `tokred eval` does."""


def base_for(family: str, path: str | Path) -> str:
    """The lmms-eval class the plugin wraps for a checkpoint of model_type ``family``; ValueError if none."""
    if family not in BASE:
        raise ValueError(f"{path} is a {family!r} checkpoint; the plugin runs model types: {', '.join(sorted(BASE))}")
    return BASE[family]


def model_args(model: str | Path, setting: Setting) -> str:
    """The plugin's ``--model_args`` for a shipped name or checkpoint directory under one setting."""
    path = resolve(model)
    family = model_type(path)
    base = base_for(family, path)
    recipe = str(setting.config)  # recipe text holds no commas, so it survives lmms-eval's model_args
    # Qwen's default min_pixels (448^2) would upscale MotionVQA's 224 px frames
    extra = f",min_pixels={MIN_PIXELS}" if family.startswith("qwen") else ""
    return f"base={base},pretrained={path},recipe={recipe}{extra}"  # simple_evaluate passes device (and so dtype)


def evaluate(
    model: str,
    settings: Sequence[Setting],
    tasks: Sequence[str],
    *,
    limit: int | None,
    batch_size: int,
    device: str,
    seed: int,
) -> list[dict]:
    """One row per (task, setting) with lmms-eval's metrics for it."""
    from lmms_eval.evaluator import simple_evaluate

    manager = task_manager(limit, seed)
    check_tasks(manager, tasks)
    rows = []
    for setting in settings:
        result = simple_evaluate(
            model="tokred",
            model_args=model_args(model, setting),
            tasks=list(tasks),
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=manager,
            bootstrap_iters=0,
        )
        if result is None:  # not the main process of a distributed launch
            continue
        for task, metrics in result["results"].items():
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
            rows.append({"task": task, "setting": setting.name, **numbers})
    return rows


def write(rows: list[dict], out: str | Path, run: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lmms_results.json"
    path.write_text(json.dumps({"run": run, "rows": rows}, indent=2, default=str) + "\n")
    return path


def table(rows: list[dict]) -> str:
    lines = ["| task | setting | metric | value |", "|---|---|---|---|"]
    for row in rows:
        for metric, value in row.items():
            if metric not in ("task", "setting"):
                lines.append(f"| {row['task']} | {row['setting']} | {metric} | {value:.4f} |")
    return "\n".join(lines)
