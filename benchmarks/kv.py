"""KV-cache quantization in one run: bits per value, KV bytes, accuracy on ShapesVQA and MotionVQA and decode-step
time for transformers' DynamicCache (stock), transformers' QuantizedCache with each backend that imports here
(quanto, HQQ, fp8) and each tokred KV scheme (`int8`, `kivi` at each ``--bits``, `vidkv`).

Per task, on a shipped checkpoint (default: the first whose card covers both tasks, else per task the first that
covers it; MotionVQA falls back to ``shapes-qwen2_5_vl`` as in `video.py`, named in the output), loaded in
``--dtype`` (bf16: the stock cache holds 16 bits a value), `tokred.eval.evaluate` runs every cache setting on the
same questions: accuracy and agreement with stock (transformers' caches go through the model's generation config,
one evaluate call each). Not answer KL: it scores the first answer token, which reads the prefill's exact keys and
values under every cache here (they quantize the prompt after it), so it is 0 by construction. On one batch of the
task's first questions, ``--decode-tokens`` forced decode steps per setting, interleaved (a warm-up round, then the
median of ``--repeats`` rounds, the order rotated each round), give the decode-step time over stock's and the
cache each setting leaves: KV bytes per question and bits per cached value, all in (a tokred cache's own
`bits_per_value()`; else every tensor its layers hold, quantized states included, over the elements it stands for).

KIVI and transformers' group-wise backends share ``--bits``, ``--group`` and ``--residual``, and VidKV takes the
same ``--group`` (tokens a block) and ``--residual``: the shipped checkpoints have head dim 32 and prompts of about
100 (shapes) and 540 (motion) tokens, so group 32 and a residual window of 32 tokens keep most of each prompt
quantized (VidKV's own defaults, blocks of 128 tokens, are for long videos at head dim 128). `int8` runs at its
defaults (per token over a head's channels, nothing kept exact). tokred's caches run patched, so every decode step
reads the store through the fused decode attention (`tokred.kernels.kv_attention.store_attention`): the Triton
kernel on CUDA, which makes no dequantized copy of the store; on the CPU its torch reference, which dequantizes the
store every step as transformers' caches do, so CPU decode times are not the kernel's.

With CUDA it also times the fused decode attention (Triton) over each of `KERNEL_SCHEMES`' stores (KIVI 2-bit,
int8 and VidKV at their defaults, built by each scheme's own cache layer from a prefill and one decode step) against
torch SDPA over the same keys and values in bf16, one decode step across the Qwen2.5-VL-7B attention (28 layers, 4
KV heads, 7 query heads per KV head, head dim 128) at 8k, 32k and 128k tokens, with CUDA events, and the bytes each
reads per second as a share of the device's memory bandwidth. Results go to ``<out>/kv.json`` and ``kv.md``.

    python benchmarks/kv.py --threads 1                                  # 200 questions per task
    python benchmarks/kv.py --limit 16 --repeats 3 --threads 1           # quick look

On CPU only ratios are results (absolute times are not comparable figures).
"""

from __future__ import annotations

import argparse
import importlib
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from prefill import finish, start
from torch.nn import functional as F
from transformers import Cache, LogitsProcessorList, PreTrainedModel, ProcessorMixin, QuantizedCache
from video import default_checkpoint

import tokred
from tokred import compat
from tokred.eval import Setting, evaluate, questions
from tokred.eval.report import environment
from tokred.kernels.kv_attention import store_attention
from tokred.kv import QuantizedKVLayer
from tokred.measure import StepClock, kv_bits_per_value, kv_bytes
from tokred.zoo import available, card, load
from tokred.zoo.prompts import generate_answers

TASKS = ("shapes", "motion")
BACKENDS: dict[str, tuple[str | None, dict[str, int]]] = {
    "quanto": ("optimum.quanto", {"axis_key": 0, "axis_value": 0}),
    "hqq": ("hqq", {"axis_key": 1, "axis_value": 1}),
    "fp8": (None, {}),
}
"""transformers' QuantizedCache backends: the module each needs and its axes (quanto 0 and HQQ 1 both group
`q_group_size` consecutive channels of one token, keys and values alike); fp8 scales per tensor, no options."""

# Qwen2.5-VL-7B's decode attention; random bf16 keys, values and queries.
LAYERS, KV_HEADS, GROUP_HEADS, DIM, DTYPE = 28, 4, 7, 128, torch.bfloat16
GPU_TOKENS = (8192, 32768, 131072)
KERNEL_SCHEMES = ("kivi:bits=2", "int8", "vidkv")  # KIVI at the paper's group 32 and residual 128; int8 per token
KERNEL_CONFIG = SimpleNamespace(head_dim=DIM, num_key_value_heads=KV_HEADS, num_hidden_layers=1)
"""One layer of the 7B attention, for a scheme's cache."""
BANDWIDTH_HELP = "peak GB/s (default: from the device's memory clock and bus width; H100 SXM 3350, H200 4800)"


@dataclass(frozen=True)
class Run:
    """One cache setting: the tokred recipe patched in ("none": the model's own cache) and, for transformers'
    QuantizedCache, the ``cache_config`` generate() gets."""

    name: str
    recipe: str = "none"
    cache_config: dict[str, Any] | None = None


def failure(error: Exception) -> str:
    """An error as one line: its type and message."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


def tokred_runs(bits: list[int], group: int, residual: int) -> list[Run]:
    """tokred's `int8` at its defaults, `kivi` at each width and `vidkv`, both with `group` and `residual`."""
    recipes = ["int8", *(f"kivi:bits={b}:group={group}:residual={residual}" for b in bits)]
    recipes.append(f"vidkv:group={group}:residual={residual}")
    return [Run(f"tokred {text}", text) for text in recipes]


def transformers_runs(config: Any, bits: list[int], group: int, residual: int) -> tuple[list[Run], dict[str, str]]:
    """QuantizedCache at each width (fp8: once) for every backend that imports and takes these options; and the
    others, each with its error."""
    runs, missing = [], {}
    for backend, (module, axes) in BACKENDS.items():
        options = [{}] if not axes else [{"nbits": b, "q_group_size": group, "residual_length": residual} for b in bits]
        try:
            if module:
                importlib.import_module(module)
            for option in options:
                QuantizedCache(backend, config, **option, **axes)
        except (ImportError, ValueError) as error:
            missing[f"QuantizedCache({backend})"] = failure(error)
            continue
        for option in options:
            width = f", {option['nbits']}-bit" if option else ""
            runs.append(Run(f"QuantizedCache({backend}{width})", cache_config={"backend": backend, **option, **axes}))
    return runs, missing


@contextmanager
def generation_cache(model: PreTrainedModel, cache_config: dict[str, Any] | None) -> Iterator[None]:
    """generate() builds a QuantizedCache of `cache_config` inside the block (None: the model's own default)."""
    config = model.generation_config
    before = config.cache_implementation, config.cache_config
    if cache_config is not None:
        config.cache_implementation, config.cache_config = "quantized", cache_config
    try:
        yield
    finally:
        config.cache_implementation, config.cache_config = before


def checkpoints(tasks: list[str], given: str | None) -> dict[str, tuple[str, str | None]]:
    """Per task, the checkpoint to run and a note where it was not trained on the task."""
    if given:
        return {task: (given, None) for task in tasks}
    both = [name for name in available() if set(tasks) <= set(card(name)["tasks"])]
    chosen = {}
    for task in tasks:
        covering = both or [name for name in available() if task in card(name)["tasks"]]
        chosen[task] = (covering[0], None) if covering else default_checkpoint()
    return chosen


def cache_cost(cache: Cache, config: Any, batch: int) -> dict[str, float]:
    """Bytes held per question, bits per cached key or value element all in, and tokens cached per question."""
    tokens = [layer.get_seq_length() for layer in cache.layers]
    return {
        "cache_bytes_per_question": kv_bytes(cache) / batch,
        "bits_per_value": kv_bits_per_value(cache, config, batch),
        "cached_tokens": max(tokens),
    }


def decode_step(
    model: PreTrainedModel, processor: ProcessorMixin, task: str, batch: list, run: Run, steps: int
) -> tuple[float, Cache]:
    """Milliseconds per decode step of one generate() over `batch` with `run`'s cache (`steps` forced), and the
    cache it left."""
    clock = StepClock()
    prompts, media = [q.record["question"] for q in batch], [q.media for q in batch]
    with tokred.patched(model, run.recipe), generation_cache(model, run.cache_config):
        _, out = generate_answers(
            model,
            processor,
            task,
            prompts,
            media,
            steps,
            logits_processor=LogitsProcessorList([clock]),
            min_new_tokens=steps,
        )
    return 1e3 * (clock.ticks[-1] - clock.ticks[0]) / (len(clock.ticks) - 1), compat.output_cache(out)


def decode_costs(
    model: PreTrainedModel, processor: ProcessorMixin, task: str, runs: list[Run], args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Per run (`runs[0]` is stock): the median decode-step time over rounds, its ratio to stock's, and the
    `cache_cost` of the cache it left; and the runs that failed in the warm-up round, each with its error."""
    batch = questions(task, args.batch)
    caches, failed = {}, {}
    for run in runs:  # warm-up; a backend that fails on these shapes (HQQ packs rows in fours) is left out
        try:
            decode_step(model, processor, task, batch, run, args.decode_tokens)
        except (RuntimeError, ValueError) as error:
            failed[run.name] = failure(error)
    runs = [run for run in runs if run.name not in failed]
    samples: dict[str, list[float]] = {run.name: [] for run in runs}
    for r in range(args.repeats):
        for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
            ms, caches[run.name] = decode_step(model, processor, task, batch, run, args.decode_tokens)
            samples[run.name].append(ms)
    config = model.config.get_text_config(decoder=True)
    stock = statistics.median(samples[runs[0].name])
    costs = {
        name: {"decode_ms": statistics.median(s), "decode_ratio": statistics.median(s) / stock, "decode_samples_ms": s}
        | cache_cost(caches[name], config, len(batch))
        for name, s in samples.items()
    }
    return costs, failed


def transformers_rows(
    model: PreTrainedModel, processor: ProcessorMixin, task: str, runs: list[Run], stock: dict, args: argparse.Namespace
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Eval rows of transformers' caches on `task`, one evaluate call each under its generation config, with
    accuracy relative to and agreement with the `stock` row (no answer KL: evaluate compares within one call);
    and the runs that failed, each with its error."""
    rows, failed = {}, {}
    for run in runs:
        try:
            with generation_cache(model, run.cache_config):
                setting = Setting(run.name, "none", run.name)
                row = evaluate(model, processor, [setting], [task], limit=args.limit, batch_size=args.batch)[0]
        except (RuntimeError, ValueError) as error:
            failed[run.name] = failure(error)
            continue
        row.agreement = statistics.mean(a == b for a, b in zip(row.answers, stock["answers"], strict=True))
        row.relative_accuracy = row.accuracy / stock["accuracy"] if stock["accuracy"] else None
        rows[run.name] = row.as_dict()
    return rows, failed


def checkpoint(name: str, tasks: list[str], args: argparse.Namespace) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """Per task, one entry per cache setting (its eval row, decode time and cache cost); and the transformers
    caches not run, each with its reason."""
    model, processor = load(name, dtype=getattr(torch, args.dtype))
    ours = tokred_runs(args.bits, args.group, args.residual)
    theirs, missing = transformers_runs(
        model.config.get_text_config(decoder=True), args.bits, args.group, args.residual
    )
    stock = Run("DynamicCache (stock)")
    settings = [Setting(stock.name, "none"), *(Setting(r.name, r.recipe, r.recipe) for r in ours)]
    rows = evaluate(model, processor, settings, tasks, limit=args.limit, batch_size=args.batch)
    entries = {}
    for task in tasks:
        by_name = {row.setting: row.as_dict() for row in rows if row.task == task}
        found, failed = transformers_rows(model, processor, task, theirs, by_name[stock.name], args)
        runs = [stock, *ours, *(run for run in theirs if run.name in found)]
        costs, broke = decode_costs(model, processor, task, runs, args)
        missing |= {f"{n} on {task}": reason for n, reason in (failed | broke).items()}
        entries[task] = [(by_name | found)[n] | {"checkpoint": name} | costs[n] for n in costs]
    return entries, missing


def table(entries: list[dict[str, Any]]) -> str:
    """Markdown: per cache setting, the eval measures, the cache's size and the decode-step time over stock."""

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    lines = [
        "| cache | accuracy | agreement | KV bytes / question | bits / value | decode step / stock |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['setting']} | {cell(e['accuracy'])} | {cell(e['agreement'])} | "
            f"{e['cache_bytes_per_question']:,.0f} | {e['bits_per_value']:.2f} | "
            f"{e['decode_ratio']:.2f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# GPU: the decode attention kernel against SDPA over bf16 keys and values
# --------------------------------------------------------------------------------------------------


def layer_inputs(scheme: Any, tokens: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """One layer's decode step at the 7B shapes, batch 1: a bf16 query, `tokens` random bf16 keys and values, and
    the layer of `scheme`'s cache (a tokred KV scheme) holding them after a prefill of all but the last and one
    decode step: its store and residual window, read packed (no dequantized copy is returned)."""
    generator = torch.Generator(device).manual_seed(seed)
    query = torch.randn(1, KV_HEADS * GROUP_HEADS, 1, DIM, generator=generator, device=device, dtype=DTYPE)
    keys, values = (
        torch.randn(1, KV_HEADS, tokens, DIM, generator=generator, device=device, dtype=DTYPE) for _ in range(2)
    )
    layer = scheme.make_cache(KERNEL_CONFIG).layers[0]
    layer.update(keys[..., :-1, :], values[..., :-1, :])
    layer.read_packed = True
    layer.update(keys[..., -1:, :], values[..., -1:, :])
    return {"query": query, "layer": layer, "dense_keys": keys, "dense_values": values}


def kernel_bytes(inputs: dict[str, Any]) -> int:
    """Bytes the kernel reads for one layer: the store all in (codes, scales, zeros, metadata), the residual window
    and the query."""
    layer: QuantizedKVLayer = inputs["layer"]
    window = [inputs["query"], layer.keys, layer.values]
    return layer.store.nbytes + sum(t.numel() * t.element_size() for t in window)


def sdpa_bytes(inputs: dict[str, Any]) -> int:
    """Bytes SDPA reads for one layer: the bf16 keys and values and the query."""
    return sum(inputs[k].numel() * inputs[k].element_size() for k in ("query", "dense_keys", "dense_values"))


def fused_step(inputs: dict[str, Any], backend: str = "triton") -> torch.Tensor:
    """One layer's decode attention over the packed store and the residual window (Triton; "torch": its
    reference)."""
    layer: QuantizedKVLayer = inputs["layer"]
    return store_attention(inputs["query"], layer.store, layer.keys, layer.values, DIM**-0.5, backend=backend)


def sdpa_step(inputs: dict[str, Any]) -> torch.Tensor:
    """One layer's decode attention by torch SDPA over the bf16 keys and values (GQA)."""
    return F.scaled_dot_product_attention(
        inputs["query"], inputs["dense_keys"], inputs["dense_values"], scale=DIM**-0.5, enable_gqa=True
    )


def cuda_ms(step: Callable[[dict[str, Any]], torch.Tensor], layers: list[dict[str, Any]], repeats: int) -> float:
    """Median milliseconds of one decode step, `step` on every layer in turn, over `repeats` CUDA-event timed
    runs after one warm-up run."""
    for layer in layers:
        step(layer)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for layer in layers:
            step(layer)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth(given: float | None) -> tuple[float, str]:
    """The device's peak memory bandwidth in GB/s and where it came from: `given`, else its memory clock (kHz)
    and bus width (bits), two transfers a clock."""
    if given:
        return given, "--bandwidth"
    props = torch.cuda.get_device_properties()
    clock, width = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock or not width:
        raise SystemExit(
            f"torch does not expose this device's memory clock and bus width: pass --bandwidth ({BANDWIDTH_HELP})"
        )
    return 2 * clock * 1e3 * width / 8 / 1e9, "device properties"


def kernels(tokens: list[int], repeats: int, bandwidth: float) -> list[dict[str, Any]]:
    """Per scheme and length: one decode step over `LAYERS` layers by the kernel and by SDPA (ms, GB/s read and
    its share of `bandwidth`), and the kernel's largest difference from the torch reference on the first layer."""
    device = torch.device("cuda")
    rows = []
    for text in KERNEL_SCHEMES:
        scheme = tokred.Config.parse(text).kv
        for n in tokens:
            layers = [layer_inputs(scheme, n, device, seed=i) for i in range(LAYERS)]
            error = (fused_step(layers[0]).float() - fused_step(layers[0], "torch").float()).abs().max()
            row: dict[str, Any] = {"scheme": text, "tokens": n, "max_abs_err": error.item()}
            for name, step, read in (("triton", fused_step, kernel_bytes), ("sdpa", sdpa_step, sdpa_bytes)):
                ms = cuda_ms(step, layers, repeats)
                rate = sum(map(read, layers)) / ms / 1e6
                row[name] = {"ms": ms, "gb_s": rate, "bandwidth_share": rate / bandwidth}
            row["speedup"] = row["sdpa"]["ms"] / row["triton"]["ms"]
            rows.append(row)
            del layers
            torch.cuda.empty_cache()
    return rows


def kernel_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per scheme and length, both paths' step time, GB/s and share of the bandwidth."""
    lines = [
        "| scheme | tokens | triton ms | GB/s (share) | SDPA bf16 ms | GB/s (share) | speed-up | max abs err |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t, s = r["triton"], r["sdpa"]
        lines.append(
            f"| {r['scheme']} | {r['tokens']:,} | {t['ms']:.3f} | {t['gb_s']:,.0f} ({t['bandwidth_share']:.0%}) | "
            f"{s['ms']:.3f} | {s['gb_s']:,.0f} ({s['bandwidth_share']:.0%}) | {r['speedup']:.2f}x | "
            f"{r['max_abs_err']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="shipped name or directory for every task (default: see above)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4], help="KIVI's and the group-wise backends'")
    parser.add_argument("--group", type=int, default=32, help="KIVI's group and q_group_size (divides head dim)")
    parser.add_argument("--residual", type=int, default=32, help="KIVI's residual and residual_length (tokens)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="model and stock cache")
    parser.add_argument("--limit", type=int, default=200, help="test questions per task")
    parser.add_argument("--batch", type=int, default=8, help="questions per generate() batch, and in the timed one")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps forced in each timed generate()")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; 1 steadies a busy machine)")
    parser.add_argument("--gpu-tokens", nargs="+", type=int, default=list(GPU_TOKENS), help="kernel lengths (CUDA)")
    parser.add_argument("--kernel-repeats", type=int, default=20, help="CUDA-event timed decode steps (median)")
    parser.add_argument("--bandwidth", type=float, help=BANDWIDTH_HELP)
    parser.add_argument("--out", type=Path, default=Path("results/kv"))
    args = parser.parse_args(argv)
    began, load_before = start(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = checkpoints(args.tasks, args.checkpoint)
    report: dict[str, Any] = {"environment": environment(), "tasks": {}, "not_run": {}}
    report |= {k: getattr(args, k) for k in ("bits", "group", "residual", "dtype", "limit", "batch", "decode_tokens")}
    report["repeats"] = args.repeats
    sections = []
    for name in dict.fromkeys(n for n, _ in chosen.values()):
        tasks = [task for task, (n, _) in chosen.items() if n == name]
        entries, missing = checkpoint(name, tasks, args)
        report["not_run"] |= missing
        for task in tasks:
            note = chosen[task][1]
            report["tasks"][task] = {"checkpoint": name, "note": note, "settings": entries[task]}
            tokens = entries[task][0]["cached_tokens"]
            head = (
                f"### {task} on {name}, {args.limit} questions ({tokens} tokens cached a question in the timed batch)"
            )
            sections += [head, note or "", table(entries[task])]
    sections += [f"not run: {setting}: {reason}" for setting, reason in report["not_run"].items()]
    sections.append(
        f"KV bytes and bits / value: one batch of {args.batch} questions after {args.decode_tokens} decode steps, "
        f"padding included; decode step / stock: median of {args.repeats} interleaved rounds (CPU: ratios only). "
        "tokred's caches read their store through the fused decode attention: on CUDA the Triton kernel, on the "
        "CPU its torch reference (which dequantizes the store every step), so CPU times are not the kernel's. "
        "Answer KL (JSON only) is 0 by construction: the first answer token reads the prefill's exact keys and "
        "values."
    )
    if torch.cuda.is_available():
        bandwidth, source = peak_bandwidth(args.bandwidth)
        report["gpu"] = {"bandwidth_gb_s": bandwidth, "bandwidth_from": source}
        report["gpu"]["rows"] = kernels(args.gpu_tokens, args.kernel_repeats, bandwidth)
        sections += [
            f"### decode attention, Qwen2.5-VL-7B shapes ({LAYERS} layers, {KV_HEADS} KV heads x {GROUP_HEADS} query "
            f"heads, head dim {DIM}), one step, batch 1, {torch.cuda.get_device_name()}, peak {bandwidth:,.0f} GB/s "
            f"({source})",
            kernel_table(report["gpu"]["rows"]),
        ]
    else:
        sections.append("no CUDA device: the decode-attention kernel vs SDPA comparison (8k-128k tokens) was skipped")
    return finish(report, sections, args.out / "kv", began, load_before)


if __name__ == "__main__":
    main()
