"""One patched model's runtime: the hooks that feed each stage, and the stats of the last call."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from tokred.adapters.base import Adapter
from tokred.config import Config
from tokred.methods.base import Method
from tokred.stages.llm import SUPPORTED_ATTENTION, LLMStage
from tokred.stages.pre_llm import PreLLMStage
from tokred.stages.sequence import Selection
from tokred.stats import Stats


class Session:
    """Installs the stages of `config` on a model and undoes them exactly."""

    def __init__(self, adapter: Adapter, config: Config) -> None:
        self.adapter, self.config = adapter, config
        if "llm" in config.methods:
            self._check_llm_stage(config.methods["llm"])
        active = {stage: m for stage, m in config.methods.items() if not m.idle}
        self.pre = PreLLMStage(active["pre_llm"], adapter) if "pre_llm" in active else None
        self.llm = LLMStage(active["llm"], adapter) if "llm" in active else None
        self.spans = None
        self.stats = Stats()
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        self._undo += self.adapter.install()
        self._undo.append(self.adapter.outer.register_forward_pre_hook(self._before_outer, with_kwargs=True).remove)
        self._undo.append(
            self.adapter.language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True).remove
        )
        if self.llm is not None:
            self._undo += self.llm.install()

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _check_llm_stage(self, method: Method) -> None:
        layers = len(self.adapter.layers)
        if not 0 <= method.layer < layers - 1:
            raise ValueError(
                f"{type(method).__name__}.layer={method.layer} is out of range for this model's "
                f"{layers} LLM layers; allowed: 0 to {layers - 2} (tokens are dropped after layer K)"
            )
        implementation = self.adapter.text_config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the llm stage supports attn_implementation {', '.join(SUPPORTED_ATTENTION)}; "
                f"this model uses {implementation!r}"
            )

    # -- hooks --------------------------------------------------------------------------------------
    def _before_outer(self, module, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments if args else kwargs
        self.spans = self.adapter.spans(inputs)
        self.derive_positions = inputs.get("position_ids") is None and inputs.get("attention_mask") is None

    def _before_llm(self, module, args: tuple, kwargs: dict[str, Any]):
        cache = kwargs.get("past_key_values")
        seen = cache.get_seq_length() if cache is not None else 0
        spans, self.spans = self.spans, None
        if seen == 0:
            self._prefill(kwargs, spans)
        else:
            if spans:
                raise NotImplementedError(
                    "tokred cannot yet add images or videos to a cache that already holds a prompt; "
                    "call generate() on the whole conversation without past_key_values"
                )
            self._decode(kwargs, seen)
        return args, kwargs

    def _prefill(self, kwargs: dict[str, Any], spans) -> None:
        mask = kwargs.get("attention_mask")
        embeds = kwargs["inputs_embeds"]
        real = mask.sum(1).tolist() if mask is not None else [embeds.shape[1]] * embeds.shape[0]
        self.stats = Stats(seq_len={0: [int(n) for n in real]})
        if spans:
            self.stats.record("input", _positions(spans))
            self.stats.media = [[(s.kind, s.grid) for s in sample] for sample in spans]
        if self.pre is not None:
            self.pre.selection = None
        if self.llm is not None:
            self.llm.disarm()
        if not spans:
            return
        to_input = None
        if self.pre is not None:
            selection = self.pre.prefill(kwargs, spans)
            if selection is not None:
                spans = selection.remap(spans)
                to_input = selection.index
                self.stats.seq_len[0] = selection.key_valid.sum(1).tolist()
            self.stats.record("pre_llm", _positions(spans, to_input))
        if self.llm is not None:
            self.llm.arm(
                spans,
                kwargs.get("attention_mask"),
                kwargs["inputs_embeds"].shape[1],
                on_cut=lambda selection: self._record_llm(selection, spans, to_input),
            )

    def _record_llm(self, selection: Selection | None, spans, to_input) -> None:
        if selection is None:
            self.stats.record("llm", _positions(spans, to_input))
            return
        self.stats.seq_len[self.llm.layer + 1] = selection.key_valid.sum(1).tolist()
        self.stats.record("llm", _positions(selection.remap(spans), to_input, selection.index))

    def _decode(self, kwargs: dict[str, Any], seen: int) -> None:
        if self.pre is not None and self.pre.selection is not None:
            self.pre.decode(kwargs, seen, self.derive_positions)
        if self.llm is not None and self.llm.armed:
            q_len = kwargs["inputs_embeds"].shape[1]
            self.llm.step(kwargs.get("attention_mask"), seen + q_len - self.llm.seq_len)


def _positions(spans, *maps: torch.Tensor | None) -> list[torch.Tensor]:
    """Each sample's span positions carried back through the given index maps to input_ids positions."""
    out = []
    for b, sample in enumerate(spans):
        pos = torch.cat([s.positions for s in sample]) if sample else torch.zeros(0, dtype=torch.long)
        for index in reversed([m for m in maps if m is not None]):
            pos = index[b][pos]
        out.append(pos)
    return out
