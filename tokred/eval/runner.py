"""Score a grid of tokred configurations on local tasks: accuracy, kept tokens, latency, memory, KV size.

Every setting sees the same questions in the same batches, one after the other on one loaded model, so
their ratios are comparable; the stock model runs patched with the ``"none"`` recipe (bit-identical to
unpatched) so that its kept-token count is measured the same way.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm import notebook
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

import tokred
from tokred import compat
from tokred.eval.local import DEFAULT_FRAMES
from tokred.eval.tasks import Question, check, kind, questions
from tokred.measure import StepClock, kv_bytes, kv_values
from tokred.zoo.datasets.cells import target_tokens
from tokred.zoo.prompts import Kind, generate_answers


@dataclass(frozen=True)
class Setting:
    """One column of the grid: a name, what `tokred.patch` gets, and the method and keep it stands for."""

    name: str
    config: tokred.Config | str  # a Config or its text form
    method: str = "stock"
    keep: float | str = 1.0  # a ratio, or "auto" (the budget is sized per input)


STOCK = Setting("stock", "none")


def grid(
    methods: Sequence[str] = (),
    keeps: Sequence[float | str] = (),
    recipes: Sequence[str] = (),
    kv: str = "none",
    weights: str = "none",
) -> list[Setting]:
    """Stock, then each method at each keep ratio, then each recipe (a preset or recipe text, see
    `tokred.Config`), each but stock with the `kv` and `weights` schemes added (and named in the setting's name);
    clear errors for unknown names."""
    unknown = [m for m in methods if m not in tokred.METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; methods are: {', '.join(sorted(tokred.METHODS))}")
    if methods and not keeps:
        raise ValueError("--methods needs at least one --keep ratio")
    if keeps and not methods:
        raise ValueError(
            "--keep needs --methods, the methods to run at those ratios "
            f"(methods are: {', '.join(sorted(tokred.METHODS))})"
        )
    tokred.Config().with_schemes(kv, weights)  # an unknown scheme is refused even with no recipe to add it to
    named = [(f"{m} keep {_ratio(k)}", f"{m}:keep={k}") for m in methods for k in keeps] + [(t, t) for t in recipes]
    settings = [STOCK]
    for name, text in named:
        try:
            config = tokred.Config.parse(text)
        except (ValueError, TypeError) as error:
            raise ValueError(f"unknown recipe {text!r}: {error}") from error
        config = config.with_schemes(kv, weights)
        name += "".join(f"+{scheme}" for scheme in (kv, weights) if scheme != "none")
        method = "+".join(m.name for m in config.methods.values()) or "stock"
        budgets = [m.keep for m in config.prune if isinstance(m, tokred.TokenReducer)]  # frames methods have none
        settings.append(Setting(name, config, method, budgets[-1] if budgets else 1.0))
    return settings


def _ratio(keep: float | str) -> str:
    return keep if isinstance(keep, str) else f"{keep:g}"


@dataclass
class Row:
    """The measurements of one setting on one task (means are per question unless named per batch)."""

    task: str
    setting: str
    method: str
    keep: float | str
    questions: int
    accuracy: float
    relative_accuracy: float | None
    smallest_accuracy: float | None  # on the questions about each scene's smallest object (ShapesVQA)
    agreement: float | None  # share of answers equal to stock's (None for stock itself)
    answer_kl: float | None  # mean KL(stock || this) of the first answer token's distribution, in nats
    target_recall: float | None  # share of the tokens covering the question's objects that reach the LLM
    target_recall_by_stage: dict[str, float]  # the same after each stage that ran (JSON only)
    vision_tokens_in: float
    vision_tokens_kept: float
    ttft_ms: float  # mean over batches: from generate() to the first token's logits, vision encoder included
    decode_tokens_per_s: float  # batch rows x decode steps / decode time, summed over batches
    peak_memory_mb: float | None  # CUDA peak allocated during the setting; None on the CPU
    kv_bytes: float  # KV cache size after generation, per question
    kv_bits_per_value: float  # bits the caches held per key or value element, all in (a bf16 DynamicCache: 16)
    answers: list[str]  # per question, in order (JSON only)

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate(
    model,
    processor,
    settings: Sequence[Setting],
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    seed: int = 0,
    progress: bool = True,
    frames: int = DEFAULT_FRAMES,
    max_pixels: int | None = None,
) -> list[Row]:
    """Rows for every (task, setting): the same questions, batches and greedy decoding for each setting. A task is
    a synthetic task's name or a local dataset's directory (`tokred.eval.local`), whose videos are sampled to
    `frames` frames of at most `max_pixels` pixels."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for task in tasks:
        check(task, model.config.model_type)
    drawn = progress and bars()
    rows = []
    for task in tasks:
        items = questions(task, limit, seed, frames=frames, max_pixels=max_pixels)
        batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
        bar = tqdm(total=len(batches) * len(settings), desc=task, disable=not drawn, unit="batch")
        stock: tuple[Row, torch.Tensor] | None = None
        for setting in settings:
            start = time.perf_counter()
            row, logprobs = _run(model, processor, task, setting, batches, max_new_tokens, bar)
            if setting.method == "stock" and stock is None:
                stock = row, logprobs
            elif stock is not None:
                compare(row, logprobs, *stock)
            rows.append(row)
            if progress and not drawn:
                seconds = time.perf_counter() - start
                line = f"{task}  {setting.name}  {row.questions} questions  acc {row.accuracy:.3f}  {seconds:.1f} s"
                print(line, file=sys.stderr, flush=True)
        bar.close()
    return rows


def compare(row: Row, logprobs: torch.Tensor, stock: Row, stock_logprobs: torch.Tensor) -> None:
    """Fill in what `row` keeps of the stock run: relative accuracy, agreement and the first answer token's KL."""
    row.relative_accuracy = row.accuracy / stock.accuracy if stock.accuracy else None
    row.agreement = sum(a == b for a, b in zip(row.answers, stock.answers, strict=True)) / len(row.answers)
    kl = (stock_logprobs.exp() * (stock_logprobs - logprobs)).sum(-1)
    row.answer_kl = float(kl.mean())


def bars() -> bool:
    """Progress as tqdm bars on a terminal or notebook; elsewhere (CI, log files) as lines, not piled-up bar frames."""
    return sys.stderr.isatty() or issubclass(tqdm, notebook.tqdm)


def _run(
    model, processor, task: str, setting: Setting, batches: list[list[Question]], max_new_tokens: int, bar
) -> tuple[Row, torch.Tensor]:
    """One setting over the batches: its row (the comparisons with stock left empty) and the first answer
    token's log-probabilities per question."""
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    correct = n = vision_in = vision_kept = kv = kv_held = 0
    given: list[str] = []
    small: list[bool] = []
    logprobs: list[torch.Tensor] = []
    recall: dict[str, list[int]] = {}  # stage -> [target tokens kept, target tokens]
    asks = kind(task)
    ttft, decode_steps, decode_time = [], 0, 0.0
    with tokred.patched(model, setting.config):
        _answers(model, processor, asks, batches[0][:1], max_new_tokens)  # warm-up, not measured
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for batch in batches:
            clock = StepClock()
            start = time.perf_counter()
            answers, out = _answers(model, processor, asks, batch, max_new_tokens, clock)
            ttft.append(clock.ticks[0] - start)
            decode_steps += (len(clock.ticks) - 1) * len(batch)
            decode_time += clock.ticks[-1] - clock.ticks[0]
            stats = tokred.stats(model)
            vision_in += sum(stats.vision_tokens["input"])
            vision_kept += sum(list(stats.vision_tokens.values())[-1])
            cache = compat.output_cache(out)
            kv += kv_bytes(cache)
            kv_held += kv_values(cache, model.config.get_text_config(decoder=True), len(batch))
            logprobs.append(out.logits[0].float().log_softmax(-1).cpu())
            for stage, (kept, total) in target_counts(stats, batch).items():
                counts = recall.setdefault(stage, [0, 0])
                counts[0], counts[1] = counts[0] + kept, counts[1] + total
            given += answers
            right = [a == q.answer for a, q in zip(answers, batch, strict=True)]
            correct += sum(right)
            small += [ok for ok, q in zip(right, batch, strict=True) if q.record.get("about_smallest")]
            n += len(batch)
            bar.update()
    by_stage = {stage: kept / total for stage, (kept, total) in recall.items() if total}
    row = Row(
        task=task,
        setting=setting.name,
        method=setting.method,
        keep=setting.keep,
        questions=n,
        accuracy=correct / n,
        relative_accuracy=None,
        smallest_accuracy=sum(small) / len(small) if small else None,
        agreement=None,
        answer_kl=None,
        target_recall=list(by_stage.values())[-1] if by_stage else None,
        target_recall_by_stage=by_stage,
        vision_tokens_in=vision_in / n,
        vision_tokens_kept=vision_kept / n,
        ttft_ms=1e3 * sum(ttft) / len(ttft),
        decode_tokens_per_s=decode_steps / decode_time if decode_time > 0 else 0.0,
        peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
        kv_bytes=kv / n,
        kv_bits_per_value=8 * kv / kv_held if kv_held else 0.0,
        answers=given,
    )
    return row, torch.cat(logprobs)


def target_counts(stats: tokred.Stats, batch: list[Question]) -> dict[str, tuple[int, int]]:
    """Per stage ("input" first): how many of the tokens covering each question's target objects were still
    there, and how many there were, over the batch's questions with one medium on a known grid."""
    counts: dict[str, list[int]] = {stage: [0, 0] for stage in stats.kept_positions}
    for b, question in enumerate(batch):
        media = stats.media[b]
        if len(media) != 1 or media[0][1] is None or not question.record.get("targets"):
            continue
        grid, frames = media[0][1], question.media if isinstance(question.media, list) else [question.media]
        size = frames[0].width
        if size % grid[1] or size % grid[2]:
            continue
        targets = stats.kept_positions["input"][b][torch.from_numpy(target_tokens(question.record, grid, size))]
        for stage, kept in stats.kept_positions.items():
            counts[stage][0] += int(torch.isin(targets, kept[b]).sum())
            counts[stage][1] += len(targets)
    return {stage: (kept, total) for stage, (kept, total) in counts.items()}


def _answers(model, processor, asks: Kind, batch: list[Question], max_new_tokens: int, clock=None):
    """Greedy answers (each the task answer its output starts with, `leading_answer`) and generate()'s output
    (with the logits; decoding runs on for `max_new_tokens`, which the decode timings measure)."""
    processors = LogitsProcessorList([clock] if clock else [])
    return generate_answers(
        model,
        processor,
        asks,
        [q.record["question"] for q in batch],
        [q.media for q in batch],
        max_new_tokens,
        logits_processor=processors,
        output_logits=True,
    )
