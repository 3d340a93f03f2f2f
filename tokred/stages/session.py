"""One patched model's runtime: the hooks that feed each stage, and the stats of the last call."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.config import Config
from tokred.methods.base import Method
from tokred.stages import BUILT
from tokred.stages.llm import SUPPORTED_ATTENTION, LLMStage
from tokred.stages.pre_llm import PreLLMStage
from tokred.stats import Stats
from tokred.tokens import Selection

IGNORE = -100
"""transformers' label for positions that carry no loss."""


class Session:
    """Installs the stages of `config` on a model and undoes them exactly."""

    def __init__(self, adapter: Adapter, config: Config) -> None:
        self.adapter, self.config = adapter, config
        unbuilt = [m for m in config.methods.values() if m.stage not in BUILT]
        if unbuilt:
            method = unbuilt[0]
            raise ValueError(
                f"method {method.name!r} runs in stage {method.stage!r}, which has no runtime yet; "
                f"stages that run: {', '.join(BUILT)}"
            )
        if "llm" in config.methods:
            self._check_llm_stage(config.methods["llm"])
        active = {stage: m for stage, m in config.methods.items() if not m.idle}
        self.pre = PreLLMStage(active["pre_llm"], adapter) if "pre_llm" in active else None
        self.llm = LLMStage(active["llm"], adapter) if "llm" in active else None
        self.cache_name = compat.cache_argument(adapter.language_model)
        self.spans = None
        self.stats = Stats()
        # Within one generate() call: the prompt's selections, so calls without a cache (use_cache=False)
        # reuse them instead of choosing again for every new token.
        self.generating = False
        self.prompt: dict[str, Any] | None = None
        # The last prefill's length and, where it cut, the map from the logits' positions back to input_ids
        # (index, valid), for the labels.
        self.input_len = 0
        self.kept: tuple[torch.Tensor, torch.Tensor] | None = None
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        self._undo += self.adapter.install()
        self._undo.append(self.adapter.outer.register_forward_pre_hook(self._before_outer, with_kwargs=True).remove)
        self._undo.append(
            self.adapter.language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True).remove
        )
        if self.llm is not None:
            self._undo += self.llm.install()
        self._undo.append(compat.wrap_loss(self.adapter.model, self._loss))
        self._undo.append(self._wrap_generate())

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
        implementation = compat.attention_implementation(self.adapter.text_config)
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the llm stage supports attn_implementation {', '.join(SUPPORTED_ATTENTION)}; "
                f"this model uses {implementation!r}"
            )

    def _wrap_generate(self) -> Callable[[], None]:
        """Mark the span of each generate() call: its prompt is selected once, whether or not it uses a cache."""
        model = self.adapter.model
        stock = model.generate

        @functools.wraps(stock)
        def generate(*args, **kwargs):
            outer, self.generating, self.prompt = self.generating, True, None
            try:
                return stock(*args, **kwargs)
            finally:
                self.generating, self.prompt = outer, None

        model.generate = generate
        return lambda: delattr(model, "generate")

    # -- hooks --------------------------------------------------------------------------------------
    def _before_outer(self, module, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs = compat.forward_arguments(module, args, kwargs)
        self.spans = self.adapter.spans(inputs)
        self.derive_positions = inputs.get("position_ids") is None and inputs.get("attention_mask") is None

    def _before_llm(self, module, args: tuple, kwargs: dict[str, Any]):
        cache = compat.passed_cache(kwargs, self.cache_name)
        seen = cache.get_seq_length() if cache is not None else 0
        spans, self.spans = self.spans, None
        if seen == 0:
            self._prefill(kwargs, spans, extends=cache is None and self.prompt is not None)
        else:
            if spans:
                raise NotImplementedError(
                    "tokred cannot yet add images or videos to a cache that already holds a prompt; "
                    "call generate() on the whole conversation without a cache"
                )
            self._decode(kwargs, seen)
        return args, kwargs

    def _prefill(self, kwargs: dict[str, Any], spans, extends: bool) -> None:
        """A call that starts from an empty cache; `extends`: it is the prompt of this generate() call plus
        the tokens generated so far, recomputed without a cache, so the prompt's selections are reused."""
        mask = kwargs.get("attention_mask")
        embeds = kwargs["inputs_embeds"]
        real = mask.sum(1).tolist() if mask is not None else [embeds.shape[1]] * embeds.shape[0]
        self.stats = Stats(seq_len={0: [int(n) for n in real]})
        self.input_len, self.kept = embeds.shape[1], None
        if spans:
            self.stats.record("input", _positions(spans))
            self.stats.media = [[(s.kind, s.grid) for s in sample] for sample in spans]
        if self.pre is not None:
            self.pre.selection = None
        if self.llm is not None:
            self.llm.disarm()
        if not spans:
            return
        given = self._reused(embeds.shape[1]) if extends else {}
        if self.generating and not extends:
            self.prompt = {"length": embeds.shape[1]}
        to_input = None
        if self.pre is not None:
            selection = self.pre.prefill(kwargs, spans, given.get("pre_llm"))
            self._remember("pre_llm", selection)
            if selection is not None:
                spans = selection.remap(spans)
                to_input = selection.index
                self.stats.seq_len[0] = selection.key_valid.sum(1).tolist()
                self.kept = (selection.index, selection.key_valid)
            self.stats.record("pre_llm", _positions(spans, to_input))
        if self.llm is not None:
            self.llm.arm(
                spans,
                kwargs.get("attention_mask"),
                kwargs["inputs_embeds"].shape[1],
                on_cut=lambda selection: self._record_llm(selection, spans, to_input),
                given=given.get("llm"),
            )

    def _remember(self, stage: str, selection: Selection | None) -> None:
        """Keep the prompt's selection of `stage` for the rest of this generate() call."""
        if self.prompt is not None and stage not in self.prompt:
            self.prompt[stage] = selection

    def _reused(self, length: int) -> dict[str, Selection | None]:
        """The prompt's selections, extended by the tokens that followed it."""
        added = length - self.prompt["length"]
        return {stage: s if s is None else s.extend(added) for stage, s in self.prompt.items() if stage != "length"}

    def _record_llm(self, selection: Selection | None, spans, to_input) -> None:
        self._remember("llm", selection)
        if selection is None:
            self.stats.record("llm", _positions(spans, to_input))
            return
        self.stats.seq_len[self.llm.layer + 1] = selection.key_valid.sum(1).tolist()
        self.stats.record("llm", _positions(selection.remap(spans), to_input, selection.index))
        index = selection.index if to_input is None else to_input.gather(1, selection.index)
        self.kept = (index, selection.key_valid)

    def _decode(self, kwargs: dict[str, Any], seen: int) -> None:
        if self.pre is not None and self.pre.selection is not None:
            self.pre.decode(kwargs, seen, self.derive_positions)
        if self.llm is not None and self.llm.armed:
            q_len = kwargs["inputs_embeds"].shape[1]
            self.llm.step(kwargs.get("attention_mask"), seen + q_len - self.llm.seq_len)

    def _loss(self, stock: Callable[..., torch.Tensor], *, logits: torch.Tensor, labels: torch.Tensor, **kwargs):
        """The model's loss with `labels` cut like the tokens: each kept position keeps its own next-token label."""
        if self.kept is None or labels.shape[-1] == logits.shape[1]:
            return stock(logits=logits, labels=labels, **kwargs)
        index, valid = self.kept
        if labels.shape[-1] != self.input_len or kwargs.get("shift_labels") is not None:
            raise ValueError(
                f"labels cover {labels.shape[-1]} positions but the inputs had {self.input_len}; pass labels "
                "aligned with input_ids (tokred cuts them with the vision tokens), not shift_labels"
            )
        shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
        shifted = shifted.gather(1, index.to(labels.device)).masked_fill(~valid.to(labels.device), IGNORE)
        return stock(logits=logits, labels=shifted, shift_labels=shifted, **kwargs)


def _positions(spans, *maps: torch.Tensor | None) -> list[torch.Tensor]:
    """Each sample's span positions carried back through the given index maps to input_ids positions."""
    out = []
    for b, sample in enumerate(spans):
        pos = torch.cat([s.positions for s in sample]) if sample else torch.zeros(0, dtype=torch.long)
        for index in reversed([m for m in maps if m is not None]):
            pos = index[b][pos]
        out.append(pos)
    return out
