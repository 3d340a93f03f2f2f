"""LLM prefill time, stock vs tokred-patched, measured in one run with the configurations interleaved.

CPU (default): a small random-weight checkpoint from `tokred.zoo` and a noise video through its processor.
`--gpu`: the Qwen2.5-VL-7B architecture with random bf16 weights on CUDA and 8,192 video tokens built
without a tokenizer or processor.

The LLM prefill is timed from a forward pre-hook to a forward hook on `model.model.language_model` (so
tokred's pre-LLM cut and FastV's scoring count as prefill), the vision encoder likewise on
`model.model.visual`, and the whole forward around the call. Each forward is a prefill as generate()
runs it: a fresh cache, logits of the last position only.

    python benchmarks/prefill.py [--family qwen2_5_vl] [--repeats N] [--out results/prefill.json] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, Qwen2_5_VLConfig

import tokred
from tokred.adapters import adapter_for
from tokred.zoo import build

STOCK = "stock"
CONFIGS = ("random-50", "random-25", "fastv-25")
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # video families whose frame size the processor call can raise

# CPU model: small but not tiny, so the LLM's matmuls dominate the call overheads.
CPU_TEXT = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 1408,
}

# Qwen2.5-VL-7B-Instruct's architecture (config.json of the hub checkpoint); weights stay random.
QWEN2_5_VL_7B_TEXT: dict[str, Any] = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 128000,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
}
QWEN2_5_VL_7B_VISION: dict[str, Any] = {
    "depth": 32,
    "hidden_size": 1280,
    "num_heads": 16,
    "intermediate_size": 3420,
    "hidden_act": "silu",
    "out_hidden_size": 3584,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2,
}
# (t, h, w) in patches: 64 frames of 448x448 -> 32 * 32 * 32 / 2**2 = 8,192 video tokens.
GPU_GRID = (32, 32, 32)


# --------------------------------------------------------------------------------------------------
# models and inputs
# --------------------------------------------------------------------------------------------------


def noise_video(frames: int, side: int, seed: int = 0) -> list[Image.Image]:
    """Uniform-noise frames, so every vision token differs."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(frames)]


def cpu_setup(family: str, frames: int, side: int, attn: str) -> tuple[PreTrainedModel, dict[str, torch.Tensor]]:
    """A zoo checkpoint (float32) and a processed video prompt with frames of `side` x `side` pixels."""
    path = build(family, **CPU_TEXT)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(path)
    content = [{"type": "video"}, {"type": "text", "text": "describe what happens in the video"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    # The zoo caps frames at 112x112; raise the cap. Qwen3-VL's pixel budget spans all frames, Qwen2(.5)-VL's one.
    pixels = side * side * (frames if family == "qwen3_vl" else 1)
    size = {"shortest_edge": processor.video_processor.size["shortest_edge"], "longest_edge": pixels}
    inputs = processor(videos=[noise_video(frames, side)], text=[prompt], size=size, return_tensors="pt")
    return model.eval(), dict(inputs)


def qwen2_5_vl_config(text: dict[str, Any], vision: dict[str, Any]) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config with the stock special token ids (vision_start 151652, video_pad 151656, ...)."""
    return Qwen2_5_VLConfig(text_config=dict(text), vision_config=dict(vision), tie_word_embeddings=False)


def random_model(config: Qwen2_5_VLConfig, device: torch.device, dtype: torch.dtype, attn: str) -> PreTrainedModel:
    """Randomly initialised weights allocated directly on `device`; no hub, no checkpoint."""
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def synthetic_video_inputs(
    config: Qwen2_5_VLConfig,
    grid_thw: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
    text_tokens: tuple[int, int] = (16, 32),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Model inputs for one video prompt, built from the config's token ids alone (no tokenizer, no processor).

    Layout: text, <|vision_start|>, t*h*w/merge**2 <|video_pad|>, <|vision_end|>, text. `mm_token_type_ids`
    marks the video placeholders 2 (text 0, image 1), which Qwen2.5-VL's get_rope_index needs for M-RoPE.
    `grid_thw` is in patches, as a processor's `video_grid_thw`; pixels are one row per patch.
    """
    vision = config.vision_config
    t, h, w = grid_thw
    generator = torch.Generator().manual_seed(seed)
    special = [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id]
    ordinary = min(special + [i for i in (config.text_config.bos_token_id, config.text_config.eos_token_id) if i])

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, ordinary, (n,), generator=generator)

    video = torch.full((t * h * w // vision.spatial_merge_size**2,), config.video_token_id)
    ids = torch.cat(
        [
            text(text_tokens[0]),
            torch.tensor([config.vision_start_token_id]),
            video,
            torch.tensor([config.vision_end_token_id]),
            text(text_tokens[1]),
        ]
    )[None]
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == config.video_token_id).long() * 2,
        "pixel_values_videos": torch.randn(t * h * w, patch, generator=generator).to(dtype),
        "video_grid_thw": torch.tensor([grid_thw]),
        "second_per_grid_ts": torch.ones(1),  # 2 fps sampling: one temporal patch of 2 frames per second
    }
    return {k: v.to(device) for k, v in inputs.items()}


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------


class Clock:
    """Host timestamps on CPU; CUDA events on the current stream on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Sections:
    """Forward pre/post hooks timing named submodules; a module called twice in one forward adds up."""

    def __init__(self, clock: Clock, modules: dict[str, nn.Module]) -> None:
        self.clock = clock
        self.marks: dict[str, list[Any]] = {name: [] for name in modules}
        self.handles = []
        for name, module in modules.items():
            # prepend: start before tokred's own pre-hook, so its cut counts as part of the section
            self.handles.append(module.register_forward_pre_hook(partial(self._mark, name), prepend=True))
            self.handles.append(module.register_forward_hook(partial(self._mark, name), always_call=True))

    def _mark(self, name: str, *_: Any) -> None:
        self.marks[name].append(self.clock.now())

    def reset(self) -> None:
        for marks in self.marks.values():
            marks.clear()

    def ms(self) -> dict[str, float]:
        """Milliseconds per section since the last reset (call after `clock.sync()`)."""
        return {name: sum(map(self.clock.ms, m[0::2], m[1::2])) for name, m in self.marks.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class Result:
    """All repeats of one configuration, and the tokens it kept."""

    name: str
    samples: list[dict[str, float]] = field(default_factory=list)
    vision_tokens: dict[str, list[int]] = field(default_factory=dict)
    seq_len: dict[int, list[int]] = field(default_factory=dict)

    def median(self, key: str) -> float:
        return statistics.median(s[key] for s in self.samples)


def forward(model: PreTrainedModel, inputs: dict[str, torch.Tensor], clock: Clock, sections: Sections) -> dict:
    """One prefill: fresh cache, last-position logits. Returns ms per section, the whole forward and peak memory."""
    sections.reset()
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = clock.now()
    model(**inputs, use_cache=True, logits_to_keep=1)
    end = clock.now()
    clock.sync()
    sample = {**sections.ms(), "forward": clock.ms(start, end)}
    if clock.cuda:
        sample["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return sample


def stock_tokens(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """What the unpatched model feeds its LLM, in `tokred.Stats` form."""
    ids = inputs["input_ids"]
    placeholders = {model.config.image_token_id, getattr(model.config, "video_token_id", None)} - {None}
    vision = sum((ids == i).sum(1) for i in placeholders)
    return {"input": vision.tolist()}, {0: inputs["attention_mask"].sum(1).tolist()}


def run_one(model: PreTrainedModel, inputs: dict, result: Result, clock: Clock, sections: Sections) -> None:
    """One forward of `result.name` (stock: unpatched), patched around the call only."""
    patched = nullcontext() if result.name == STOCK else tokred.patched(model, result.name)
    with patched:
        sample = forward(model, inputs, clock, sections)
        if result.name == STOCK:
            result.vision_tokens, result.seq_len = stock_tokens(model, inputs)
        else:
            stats = tokred.stats(model)
            result.vision_tokens, result.seq_len = dict(stats.vision_tokens), dict(stats.seq_len)
    result.samples.append(sample)


def measure(model: PreTrainedModel, inputs: dict, names: list[str], repeats: int, warmup: int) -> list[Result]:
    """Warm every configuration up, then `repeats` rounds over all of them, the order rotated each round."""
    device = next(model.parameters()).device
    clock = Clock(device)
    adapter = adapter_for(model)
    sections = Sections(clock, {"vision": adapter.vision_tower, "llm": adapter.language_model})
    results = {name: Result(name) for name in names}
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for name in names:
                    run_one(model, inputs, Result(name), clock, sections)
            for r in range(repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    run_one(model, inputs, results[name], clock, sections)
    finally:
        sections.remove()
    return list(results.values())


# --------------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------------


def layer_fraction(seq_len: dict[int, list[int]], stock_len: int, layers: int) -> float:
    """Sum over LLM layers of the tokens each layer sees, over the stock's: the linear-cost prediction."""
    starts = sorted(seq_len)
    per_layer = [seq_len[max(s for s in starts if s <= layer)][0] for layer in range(layers)]
    return sum(per_layer) / (stock_len * layers)


def round_ratios(result: Result, stock: Result, key: str) -> list[float]:
    """Quartiles of the per-round ratios (each round runs every configuration back to back)."""
    ratios = [s[key] / b[key] for s, b in zip(result.samples, stock.samples, strict=True)]
    return statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3


def summarise(results: list[Result], layers: int) -> dict[str, dict[str, Any]]:
    """Medians, ratios patched/stock and kept tokens per configuration (first sample of the batch)."""
    stock = results[0]
    keys = [k for k in stock.samples[0] if k != "peak_gib"]
    base = {k: stock.median(k) for k in keys}
    out = {}
    for result in results:
        median = {k: result.median(k) for k in keys}
        entry: dict[str, Any] = {
            "median_ms": median,
            "ratio": {k: median[k] / base[k] for k in keys},
            "llm_ratio_round_quartiles": round_ratios(result, stock, "llm"),
            "llm_speedup": base["llm"] / median["llm"],
            "vision_tokens": result.vision_tokens,
            "llm_seq_len": {str(k): v for k, v in sorted(result.seq_len.items())},
            "token_layer_fraction": layer_fraction(result.seq_len, stock.seq_len[0][0], layers),
            "samples": result.samples,  # ms per section (+ peak_gib on GPU), in run order
        }
        if "peak_gib" in result.samples[0]:
            entry["peak_gib"] = max(s["peak_gib"] for s in result.samples)
        out[result.name] = entry
    return out


def _tokens(entry: dict[str, Any]) -> tuple[str, str]:
    vision = " → ".join(f"{counts[0]}" for counts in entry["vision_tokens"].values())
    seq = ", ".join(f"L{layer}: {counts[0]}" for layer, counts in entry["llm_seq_len"].items())
    return vision, seq


def table(summary: dict[str, dict[str, Any]], gpu: bool) -> str:
    """Markdown table: ratios and kept tokens; absolute times and peak memory on GPU only."""
    head = ["config", "vision tokens (input → kept)", "LLM tokens from layer", "token·layers"]
    head += ["LLM prefill ratio (round IQR)"]
    head += ["LLM speedup", "forward ratio", "vision ratio"]
    if gpu:
        head += ["vision ms", "LLM ms", "forward ms", "peak GiB"]
    rows = [head, ["---"] * len(head)]
    for name, e in summary.items():
        ratio, ms = e["ratio"], e["median_ms"]
        low, _, high = e["llm_ratio_round_quartiles"]
        row = [name, *_tokens(e), f"{e['token_layer_fraction']:.3f}", f"{ratio['llm']:.3f} ({low:.3f}–{high:.3f})"]
        row += [f"{e['llm_speedup']:.2f}x", f"{ratio['forward']:.3f}", f"{ratio['vision']:.3f}"]
        if gpu:
            row += [f"{ms['vision']:.1f}", f"{ms['llm']:.1f}", f"{ms['forward']:.1f}", f"{e['peak_gib']:.1f}"]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def split_line(stock: dict[str, Any]) -> str:
    """Where the stock forward's time goes, as fractions."""
    ms = stock["median_ms"]
    vision, llm = ms["vision"] / ms["forward"], ms["llm"] / ms["forward"]
    return f"stock forward: vision encoder {vision:.0%}, LLM prefill {llm:.0%}, rest {1 - vision - llm:.0%}"


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return {
        "type": "cpu",
        "name": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }


def model_info(model: PreTrainedModel, attn: str) -> dict[str, Any]:
    text, vision = model.config.text_config, model.config.vision_config
    text_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")
    return {
        "class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype),
        "attn_implementation": attn,
        "parameters": sum(p.numel() for p in model.parameters()),
        "text": {k: getattr(text, k) for k in text_keys},
        "vision": {k: getattr(vision, k, None) for k in ("depth", "hidden_size", "num_heads", "intermediate_size")},
    }


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen2_5_vl", choices=FAMILIES, help="zoo family (CPU only)")
    parser.add_argument("--repeats", type=int, default=10, help="measured rounds over all configurations")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--out", type=Path, default=Path("results/prefill.json"))
    parser.add_argument("--gpu", action="store_true", help="Qwen2.5-VL-7B architecture, bf16, 8,192 video tokens")
    parser.add_argument("--frames", type=int, default=64, help="CPU video frames (2 frames per temporal patch)")
    parser.add_argument("--frame-size", type=int, default=224, help="CPU frame side in pixels")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated tokred presets")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation")
    args = parser.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in tokred.PRESETS]
    if unknown:
        parser.error(f"unknown presets {unknown}; presets are: {', '.join(tokred.PRESETS)}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.gpu and args.family != "qwen2_5_vl":
        parser.error("--gpu benchmarks the Qwen2.5-VL-7B architecture; --family applies to the CPU run")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA device")
    return args


def setup(args: argparse.Namespace) -> tuple[PreTrainedModel, dict[str, torch.Tensor], dict[str, Any]]:
    """The model, its inputs and a description of the inputs, for the CPU or the GPU run."""
    if args.gpu:
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = qwen2_5_vl_config(QWEN2_5_VL_7B_TEXT, QWEN2_5_VL_7B_VISION)
        model = random_model(config, device, dtype, args.attn)
        inputs = synthetic_video_inputs(config, GPU_GRID, device, dtype)
        return model, inputs, {"kind": "synthetic video", "video_grid_thw": list(GPU_GRID)}
    model, inputs = cpu_setup(args.family, args.frames, args.frame_size, args.attn)
    grid = inputs["video_grid_thw"][0].tolist()
    return model, inputs, {"kind": "noise video", "frames": args.frames, "frame_size": args.frame_size, "grid": grid}


def build_report(
    args: argparse.Namespace, model: PreTrainedModel, inputs: dict, described: dict, summary: dict
) -> dict[str, Any]:
    """Everything the JSON records: versions, device, model, input, protocol, results."""
    device = inputs["input_ids"].device
    return {
        "benchmark": "prefill",
        "mode": "gpu" if args.gpu else "cpu",
        "note": None if args.gpu else "absolute CPU times are not comparable figures; only ratios are results",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokred": tokred.__version__,
        },
        "device": device_info(device),
        "model": {"family": "qwen2_5_vl-7b-arch" if args.gpu else args.family, **model_info(model, args.attn)},
        "input": {**described, "seq_len": inputs["input_ids"].shape[1]},
        "protocol": {
            "repeats": args.repeats,
            "warmup_rounds": args.warmup,
            "order": "round-robin over configurations, rotated by one each round",
            "statistic": "median; ratio = patched median / stock median",
            "llm_timer": "forward pre-hook (first) to forward hook on model.model.language_model",
            "forward": "model(**inputs, use_cache=True, logits_to_keep=1) under torch.inference_mode()",
        },
        "results": summary,
    }


def start(threads: int | None = None) -> tuple[float, tuple[float, float, float]]:
    """A benchmark run's common start: torch's CPU threads (where given), quiet transformers, seed 0; returns
    the start time and the load averages then (other work on the machine skews timings)."""
    if threads:
        torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    return time.perf_counter(), os.getloadavg()


def finish(report: dict[str, Any], sections: list[str], stem: Path, began: float, load_before: tuple) -> dict[str, Any]:
    """Add the load average and runtime to `report`, write it to ``<stem>.json`` and its sections (the empty ones
    left out) to ``<stem>.md``, print them and return the report."""
    report["load_average"] = {"start": load_before, "end": os.getloadavg()}
    report["runtime_s"] = time.perf_counter() - began
    text = "\n\n".join(s for s in sections if s)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {stem}.json, {stem.name}.md ({report['runtime_s']:.0f} s)")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    began, load = start()
    model, inputs, described = setup(args)
    results = measure(model, inputs, [STOCK, *args.configs], args.repeats, args.warmup)
    summary = summarise(results, model.config.text_config.num_hidden_layers)
    report = build_report(args, model, inputs, described, summary)
    # 1/5/15-minute load averages before and after: other work on the machine skews the timings
    report["load_average"] = {"start": load, "end": os.getloadavg()}
    report["runtime_s"] = time.perf_counter() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['model']['family']} on {report['device']['name']}, {report['input']}")
    print(table(summary, args.gpu))
    print(split_line(summary[STOCK]))
    if not args.gpu:
        print("CPU run: absolute CPU times are not comparable figures; only the ratios above are results.")
    print(f"wrote {args.out} ({report['runtime_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
