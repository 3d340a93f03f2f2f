"""lmms-eval task YAMLs for tokred's local benchmarks, written next to the data they read.

`include_path()` makes sure the test questions exist (the same files `tokred eval` reads), writes
``tokred_shapes.jsonl`` / ``tokred_motion.jsonl`` with absolute media paths and a YAML per task, and returns
the directory to pass as lmms-eval's ``--include_path``. A MotionVQA clip goes to lmms-eval as the list of
its lossless PNG frames (a video item whose url is that list; lmms-eval's Qwen classes hand it to
qwen_vl_utils, which reads frame lists at 2 fps, as `tokred eval` gives clips). Those classes pass one
min/max_pixels for images and videos to the processor, overriding a checkpoint's own video size limit, so a
model whose processor shrinks frames sees them larger there (tokred's checkpoints take 224 px frames whole).
Scoring is exact match of the answer the output starts with (`tokred.zoo.prompts.leading_answer`), as in
`tokred eval`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from tokred.eval.tasks import DEFAULT_QUESTIONS, data_root, ensure
from tokred.zoo import datasets
from tokred.zoo.datasets.common import frame_name
from tokred.zoo.prompts import leading_answer

TASKS = {"shapes": "tokred_shapes", "motion": "tokred_motion"}
"""Local task -> lmms-eval task name."""

_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function tokred.eval.lmms_tasks.doc_to_visual
doc_to_text: !function tokred.eval.lmms_tasks.doc_to_text
doc_to_target: answer
process_results: !function tokred.eval.lmms_tasks.process_results
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def include_path(n: int = DEFAULT_QUESTIONS, seed: int = 0, root: str | os.PathLike | None = None) -> Path:
    """Write the task files for the first ``n`` test questions of each local task; return their directory."""
    out = Path(root) if root is not None else data_root(seed) / "lmms_tasks"
    out.mkdir(parents=True, exist_ok=True)
    for task, name in TASKS.items():
        directory = ensure(task, n, seed)
        records = datasets.load(task, directory.parent, "test")[:n]
        lines = [json.dumps(_absolute(r, directory)) for r in records]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        (out / f"{name}.yaml").write_text(_YAML.format(name=name, data=out / f"{name}.jsonl"))
    return out


def _absolute(record: dict, directory: Path) -> dict:
    """The record with its image path, or its clip's frame paths, made absolute."""
    if "image" in record:
        return {**record, "image": str(directory / record["image"])}
    clip = directory / record["video"]
    return {**record, "video": [str(clip / frame_name(t)) for t in range(record["frames"])]}


def doc_to_visual(doc: dict) -> list[Image.Image | dict]:
    """The image, or the clip as one video item whose url lists its frame files."""
    if "video" in doc:
        return [{"type": "video", "url": doc["video"]}]
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    kind = "motion" if "video" in doc else "shapes"
    return {"exact_match": float(leading_answer(results[0], kind) == doc["answer"])}
