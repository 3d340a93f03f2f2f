"""One streamed, measured answer of a model under a tokred recipe, and where its kept vision tokens sit on the grid.

The stock model runs patched with the "none" recipe (bit-identical to unpatched, as in `tokred eval`) so that
its vision tokens are measured the same way. Timings use `tokred eval`'s clock: a logits processor that
stamps every generation step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TextIteratorStreamer

import tokred
from tokred import compat
from tokred.demo.media import medium
from tokred.measure import StepClock, kv_bytes
from tokred.zoo.datasets import Media
from tokred.zoo.prompts import chat, media_inputs

STOCK = "none"
"""The recipe of the stock side: nothing removed."""
TASK = {"image": "shapes", "video": "motion"}
"""The synthetic task whose prompt format `tokred.zoo.prompts` uses for each medium."""


PRUNERS = tuple(sorted(name for name, m in tokred.METHODS.items() if m.stage not in ("kv", "weights")))
"""The method menu: the token stages' methods (KV schemes and weight bits have controls of their own)."""


def recipe(method: str, keep: float, kv: str = "none", weights: str = "none", merge: bool = False) -> tokred.Config:
    """The demo's recipe controls as what `tokred.patch` takes (the keep ratio and merge go to methods with a
    token budget); ValueError naming the allowed values."""
    if method != STOCK and method not in PRUNERS:
        raise ValueError(f"unknown method {method!r}; methods are: {STOCK}, {', '.join(PRUNERS)}")
    budgeted = method != STOCK and issubclass(tokred.METHODS[method], tokred.TokenReducer)
    text = f"{method}:keep={float(keep)}" + (":merge=True" if merge else "") if budgeted else method
    config = tokred.Config() if method == STOCK else tokred.Config.parse(text)
    return config.with_schemes(kv, weights)


@dataclass
class Run:
    """What one generate call cost and kept, measured; positions are in `input_ids`."""

    ttft_ms: float  # from generate() to the first token's logits, vision encoder included
    decode_tokens_per_s: float | None  # None when only one token was generated
    kv_bytes: int
    peak_memory_mib: float | None  # CUDA only
    stage: str  # the last stage that recorded vision tokens ("input" when nothing was cut)
    input_positions: torch.Tensor
    kept_positions: torch.Tensor
    grid: tuple[int, int, int] | None  # token grid of the image or video, where the family makes it known
    merged_groups: list[torch.Tensor] = field(default_factory=list)  # positions of each group merged into one

    def measurements(self) -> dict[str, object]:
        """The figures shown in the page, with their units in the names."""
        rate = self.decode_tokens_per_s
        return {
            "vision tokens in": int(self.input_positions.numel()),
            "vision tokens kept": int(self.kept_positions.numel()),
            "measured after stage": self.stage,
            "time to first token (ms)": round(self.ttft_ms, 1),
            "decode tokens/s": "n/a (one token)" if rate is None else round(rate),
            "KV cache bytes": self.kv_bytes,
            "peak memory (MiB)": "n/a on CPU" if self.peak_memory_mib is None else round(self.peak_memory_mib, 1),
        }


def stream(
    model, processor, config: tokred.Config | str, media: Media, question: str, max_new_tokens: int
) -> Iterator[tuple[str, Run | None]]:
    """Greedy answer of `model` patched with `config`: (text so far, None) per new piece, then (answer, Run)."""
    task = TASK[medium(media)]
    inputs = media_inputs(processor, task, [chat(processor, task, question)], [media]).to(model.device)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    clock, result = StepClock(), {}
    cuda = model.device.type == "cuda"

    def generate() -> None:
        try:
            with torch.inference_mode():
                result["start"] = time.perf_counter()
                result["out"] = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    streamer=streamer,
                    logits_processor=LogitsProcessorList([clock]),
                    return_dict_in_generate=True,
                )
        except Exception as error:  # handed to the caller's thread below
            result["error"] = error
            streamer.end()

    with tokred.patched(model, config):
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        try:
            text = ""
            for piece in streamer:
                text += piece
                yield text, None
        finally:
            worker.join()  # stay patched until generate() is done, also when the caller stops early
        if "error" in result:
            raise result["error"]
        stats = tokred.stats(model)
    out, ticks = result["out"], clock.ticks
    stage = list(stats.kept_positions)[-1]
    yield (
        processor.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True),
        Run(
            ttft_ms=1e3 * (ticks[0] - result["start"]),
            decode_tokens_per_s=(len(ticks) - 1) / (ticks[-1] - ticks[0]) if len(ticks) > 1 else None,
            kv_bytes=kv_bytes(compat.output_cache(out)),
            peak_memory_mib=torch.cuda.max_memory_allocated(model.device) / 2**20 if cuda else None,
            stage=stage,
            input_positions=stats.kept_positions["input"][0],
            kept_positions=stats.kept_positions[stage][0],
            grid=token_grid(stats.media[0]),
            merged_groups=[g for groups in stats.merged_groups.values() for g in groups[0]],
        ),
    )


def token_grid(media: list[tuple[str, tuple[int, int, int] | None]]) -> tuple[int, int, int] | None:
    """The (t, h, w) token grid of the one image or video a prompt held, as `tokred.stats` recorded it (None
    where the family does not make its grid known)."""
    if len(media) != 1:
        raise ValueError(f"expected one image or video in the prompt, found {len(media)}")
    return media[0][1]


def kept_cells(run: Run) -> list[int]:
    """Flat grid cells (t, h, w raster order) of the kept tokens; ValueError when the grid and the tokens disagree."""
    return _cells(run, run.kept_positions, "kept positions")


def merged_cells(run: Run) -> list[list[int]]:
    """Flat grid cells of each group of tokens the run merged into one."""
    return [_cells(run, group, "merged positions") for group in run.merged_groups]


def _cells(run: Run, positions: torch.Tensor, what: str) -> list[int]:
    if run.grid is None:
        raise ValueError("this model family does not make its token grid known, so kept tokens cannot be placed")
    t, h, w = run.grid
    n = int(run.input_positions.numel())
    if t * h * w != n:
        raise ValueError(f"token grid {t}x{h}x{w} has {t * h * w} cells but the input holds {n} vision tokens")
    cells = torch.searchsorted(run.input_positions, positions)
    if not torch.equal(run.input_positions[cells.clamp(max=n - 1)], positions):
        raise ValueError(f"{what} are not among the input's vision token positions")
    return cells.tolist()
