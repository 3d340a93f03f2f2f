"""Video token reduction on MotionVQA in one run: the patches the vision encoder runs on, the vision tokens the
LLM gets, accuracy and time to first token over stock, for `temporal_dedup` (the frames stage), each video
reducer and `temporal_dedup` followed by each pre_llm one.

On a checkpoint that takes video (default: the first shipped one trained on ``motion``, else
``shapes-qwen2_5_vl``, which never saw a clip, so only its agreement with stock and answer KL mean much),
`tokred.eval.evaluate` runs stock, `temporal_dedup` at each ``--thresholds``, every ``--methods`` at each
``--keeps`` and `temporal_dedup` (first threshold) followed by each pre_llm one of them (whose keep is then a
share of what `temporal_dedup` left) on the same questions.
On one batch of the task's first questions, one patched forward per setting counts the encoder patches and the
LLM's vision tokens per video (`tokred.stats`; stock encodes every patch of its grid), and `prefill.measure`
times the vision encoder and the LLM prefill of every setting against stock, interleaved (warm-up, median of
``--repeats`` rounds); time to first token is their sum (per round, then the median). With CUDA it also runs
the Qwen2.5-VL-7B architecture with random bf16 weights on a 64-frame 448x448 clip whose background stands still
(a small square crosses it), for stock, `temporal_dedup` and `temporal_dedup+random:keep=0.25`. Results go to
``<out>/video.json`` and ``video.md``.

    python benchmarks/video.py --threads 1                                   # 200 questions: ~3 min on 2 cores
    python benchmarks/video.py --limit 16 --batch 4 --repeats 2 --threads 1  # quick look: ~25 s

On CPU only ratios are results (absolute times are not comparable figures).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefill import (
    QWEN2_5_VL_7B_TEXT,
    QWEN2_5_VL_7B_VISION,
    STOCK,
    finish,
    measure,
    qwen2_5_vl_config,
    random_model,
    start,
    summarise,
    synthetic_video_inputs,
)
from quality import timing_inputs
from transformers import PreTrainedModel, Qwen2_5_VLConfig, Qwen2VLVideoProcessor

import tokred
from tokred.eval import evaluate, grid
from tokred.eval.report import environment
from tokred.zoo import available, card, load

TASK = "motion"
FALLBACK = "shapes-qwen2_5_vl"
DEDUP = "temporal_dedup"
METHODS = ("random", "dycoke", "fastvid", "vidcom2", "fastv")
GPU_RECIPES = (DEDUP, f"{DEDUP}+random:keep=0.25")
PARTS = ("vision", "llm")
"""What time to first token adds up: the vision encoder and the LLM prefill (tokred's cuts included)."""


def default_checkpoint() -> tuple[str, str | None]:
    """The first shipped checkpoint trained on the task, else `FALLBACK` with a note saying so."""
    trained = [name for name in available() if TASK in card(name)["tasks"]]
    if trained:
        return trained[0], None
    return FALLBACK, f"no shipped checkpoint is trained on {TASK}: {FALLBACK} (trained on shapes) stands in"


def recipes(methods: list[str], keeps: list[float], thresholds: list[float]) -> tuple[list[str], dict[str, str]]:
    """`temporal_dedup` at each threshold, then at the first one followed by each pre_llm method at each keep;
    and the combinations tokred refuses, each with its reason."""
    dedup = [f"{DEDUP}:threshold={t:g}" for t in thresholds]
    combined = [f"{dedup[0]}+{m}:keep={k:g}" for m in methods if tokred.METHODS[m].stage == "pre_llm" for k in keeps]
    refused = {}
    for text in combined:
        try:
            tokred.Config.parse(text)
        except ValueError as error:
            refused[text] = str(error)
    return dedup + [text for text in combined if text not in refused], refused


def counts(model: PreTrainedModel, inputs: dict, name: str) -> tuple[float, float]:
    """Encoder patches and LLM vision tokens (after the last stage) per video of one patched forward of `inputs`."""
    with torch.inference_mode(), tokred.patched(model, "none" if name == STOCK else name):
        model(**inputs, use_cache=True, logits_to_keep=1)
        stats = tokred.stats(model)
    patches = stats.encoder_patches.get("frames") or inputs["video_grid_thw"].prod(-1).tolist()
    return statistics.mean(patches), statistics.mean(list(stats.vision_tokens.values())[-1])


def ttft_ms(entry: dict[str, Any]) -> float:
    """Median over rounds of the vision encoder's plus the LLM prefill's milliseconds."""
    return statistics.median(sum(sample[part] for part in PARTS) for sample in entry["samples"])


def cost(model: PreTrainedModel, inputs: dict, names: list[str], repeats: int) -> dict[str, dict[str, Any]]:
    """Per setting (`names[0]` is stock): encoder patches and LLM vision tokens per video with their shares of
    stock's, and the vision, LLM-prefill, time-to-first-token and whole-forward time over stock's."""
    counted = {name: counts(model, inputs, name) for name in names}
    layers = model.config.get_text_config().num_hidden_layers
    summary = summarise(measure(model, inputs, names, repeats, warmup=1), layers)
    (patches, tokens), ttft = counted[STOCK], ttft_ms(summary[STOCK])
    return {
        name: {
            "encoder_patches": counted[name][0],
            "encoder_share": counted[name][0] / patches,
            "llm_tokens": counted[name][1],
            "llm_share": counted[name][1] / tokens,
            "time_ratio": {**{k: e["ratio"][k] for k in (*PARTS, "forward")}, "ttft": ttft_ms(e) / ttft},
            "median_ms": {**e["median_ms"], "ttft": ttft_ms(e)},
        }
        for name, e in summary.items()
    }


def checkpoint(name: str, args: argparse.Namespace, texts: list[str]) -> list[dict[str, Any]]:
    """One entry per setting: its eval row (accuracy, agreement, answer KL, ...) and its `cost`."""
    model, processor = load(name)
    settings = grid(args.methods, args.keeps, texts)
    rows = evaluate(model, processor, settings, [TASK], limit=args.limit)
    names = [STOCK, *(str(s.config) for s in settings[1:])]
    costs = cost(model, timing_inputs(processor, TASK, args.batch), names, args.repeats)
    return [row.as_dict() | {"setting": name} | costs[name] for name, row in zip(names, rows, strict=True)]


def moving_square(frames: int, side: int, square: int, seed: int = 0) -> np.ndarray:
    """(frames, side, side, 3) uint8: one noise background in every frame and a white `square`-pixel square
    crossing it corner to corner, so only the patches around the square change from frame to frame."""
    rng = np.random.default_rng(seed)
    video = np.repeat(rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8), frames, axis=0)
    for frame, at in enumerate(np.linspace(0, side - square, frames).round().astype(int)):
        video[frame, at : at + square, at : at + square] = 255
    return video


def moving_square_inputs(
    config: Qwen2_5_VLConfig, frames: int, side: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """`prefill.synthetic_video_inputs` with a `moving_square` clip's pixels, as Qwen's video processor makes
    them (frames kept at `side` x `side`), in place of its noise."""
    vision = config.vision_config
    processor = Qwen2VLVideoProcessor(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    pixels = side * side
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    video = processor(videos=[moving_square(frames, side, side // 8)], size=size, return_tensors="pt")
    grid_thw = tuple(video["video_grid_thw"][0].tolist())
    inputs = synthetic_video_inputs(config, grid_thw, device, dtype)
    inputs["pixel_values_videos"] = video["pixel_values_videos"].to(device, dtype)
    return inputs


def architecture(
    config: Qwen2_5_VLConfig, frames: int, side: int, device: torch.device, dtype: torch.dtype, repeats: int
) -> list[dict[str, Any]]:
    """The `cost` of stock and `GPU_RECIPES` on a random-weight model of `config` and one `moving_square` clip."""
    model = random_model(config, device, dtype, "sdpa")
    names = [STOCK, *GPU_RECIPES]
    costs = cost(model, moving_square_inputs(config, frames, side, device, dtype), names, repeats)
    return [{"setting": name} | costs[name] for name in names]


def table(entries: list[dict[str, Any]]) -> str:
    """Markdown: per setting, counts per video (share of stock), eval measures where there are any, time ratios."""

    def cell(entry: dict[str, Any], key: str) -> str:
        value = entry.get(key)
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "| setting | encoder patches / video (of stock) | LLM vision tokens / video (of stock) | accuracy | "
        "agreement | answer KL | vision / stock | LLM prefill / stock | TTFT / stock |",
        "|---" * 9 + "|",
    ]
    for e in entries:
        ratio = e["time_ratio"]
        lines.append(
            f"| {e['setting']} | {e['encoder_patches']:.0f} ({e['encoder_share']:.2f}) | "
            f"{e['llm_tokens']:.1f} ({e['llm_share']:.2f}) | {cell(e, 'accuracy')} | {cell(e, 'agreement')} | "
            f"{cell(e, 'answer_kl')} | {ratio['vision']:.2f} | {ratio['llm']:.2f} | {ratio['ttft']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help=f"shipped name or directory (default: trained on {TASK}, else {FALLBACK})")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(tokred.METHODS))
    parser.add_argument("--keeps", nargs="+", type=float, default=[0.25])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.1, 0.3], help="temporal_dedup's")
    parser.add_argument("--limit", type=int, default=200, help="test questions")
    parser.add_argument("--batch", type=int, default=8, help="questions in the counted and timed batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 steadies a busy machine)")
    parser.add_argument("--gpu", action="store_true", help="require CUDA for the 7B-architecture run (default: if any)")
    parser.add_argument("--out", type=Path, default=Path("results/video"))
    args = parser.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    began, load_before = start(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    name, note = (args.checkpoint, None) if args.checkpoint else default_checkpoint()
    texts, refused = recipes(args.methods, args.keeps, args.thresholds)
    report: dict[str, Any] = {"environment": environment(), "checkpoint": name, "note": note, "task": TASK}
    report |= {k: getattr(args, k) for k in ("methods", "keeps", "thresholds", "limit", "batch", "repeats")}
    report |= {"not_run": refused, "settings": checkpoint(name, args, texts)}
    sections = [f"### {name} on {TASK}, {args.limit} questions (counts and times: one batch of {args.batch})"]
    sections += [note or "", table(report["settings"])]
    sections += [f"not run: `{text}` ({reason})" for text, reason in refused.items()]
    if torch.cuda.is_available():
        config = qwen2_5_vl_config(QWEN2_5_VL_7B_TEXT, QWEN2_5_VL_7B_VISION)
        device = torch.device("cuda")
        report["gpu"] = architecture(config, 64, 448, device, torch.bfloat16, args.repeats)
        sections += ["### Qwen2.5-VL-7B architecture, random bf16 weights, 64 frames of 448x448", table(report["gpu"])]
    else:
        sections.append("no CUDA device: the Qwen2.5-VL-7B-architecture run (64 frames of 448x448) was skipped")
    return finish(report, sections, args.out / "video", began, load_before)


if __name__ == "__main__":
    main()
