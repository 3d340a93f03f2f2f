"""One patched model's runtime: the hooks that open a `Call` per prompt and walk the configured stages over it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.config import Config
from tokred.methods.base import STAGES
from tokred.stages.base import RUNTIMES, Stage
from tokred.stages.call import Call
from tokred.stats import Stats

IGNORE = -100
"""transformers' label for positions that carry no loss."""


class Session:
    """Installs the stages of `config` on a model and undoes them exactly. Names no stage: each configured
    method gets its stage's runtime from `RUNTIMES`, and they run in pipeline order."""

    def __init__(self, adapter: Adapter, config: Config) -> None:
        self.adapter, self.config = adapter, config
        for method in config.methods.values():
            if method.stage not in RUNTIMES:
                built = ", ".join(s for s in STAGES if s in RUNTIMES)
                raise ValueError(
                    f"method {method.name!r} runs in stage {method.stage!r}, which has no runtime yet; "
                    f"stages that run: {built}"
                )
        self.stages: list[Stage] = [
            RUNTIMES[stage](method, adapter, self.current)
            for stage, method in config.methods.items()  # in pipeline order
            if not method.idle
        ]
        self.cache_name = compat.cache_argument(adapter.language_model)
        self.call: Call | None = None  # the prompt in flight (its prefill and decode steps)
        self.outer: tuple[Any, bool] | None = None  # spans and derive_positions from the outer model's inputs
        # Within one generate() call: its prompt's Call, whose cuts calls without a cache (use_cache=False)
        # reuse instead of choosing again for every new token.
        self.generating = False
        self.prompt: Call | None = None
        self._undo: list[Callable[[], None]] = []

    @property
    def stats(self) -> Stats:
        return self.call.stats if self.call is not None else Stats()

    def current(self) -> Call | None:
        return self.call

    def install(self) -> None:
        self._undo += self.adapter.install()
        self._undo.append(self.adapter.outer.register_forward_pre_hook(self._before_outer, with_kwargs=True).remove)
        self._undo.append(
            self.adapter.language_model.register_forward_pre_hook(self._before_llm, with_kwargs=True).remove
        )
        for stage in self.stages:
            self._undo += stage.install()
        self._undo.append(compat.wrap_loss(self.adapter.model, self._loss))
        self._undo.append(self._wrap_generate())

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _wrap_generate(self) -> Callable[[], None]:
        """Mark the span of each generate() call (its prompt is selected once, whether or not it uses a cache) and
        let each stage adjust its arguments."""
        model = self.adapter.model
        stock = model.generate

        @functools.wraps(stock)
        def generate(*args, **kwargs):
            for stage in self.stages:
                stage.generate(kwargs)
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
        derive = inputs.get("position_ids") is None and inputs.get("attention_mask") is None
        self.outer = (self.adapter.spans(inputs), derive)

    def _before_llm(self, module, args: tuple, kwargs: dict[str, Any]):
        cache = compat.passed_cache(kwargs, self.cache_name)
        seen = cache.get_seq_length() if cache is not None else 0
        (spans, derive), self.outer = self.outer or (None, True), None
        if seen == 0:
            self._prefill(kwargs, spans, derive, extends=cache is None and self.prompt is not None)
        elif spans:
            raise NotImplementedError(
                "tokred cannot yet add images or videos to a cache that already holds a prompt; "
                "call generate() on the whole conversation without a cache"
            )
        elif self.call is not None:
            self.call.kwargs, self.call.seen = kwargs, seen
            for stage in self.stages:
                stage.decode(self.call)
        return args, kwargs

    def _prefill(self, kwargs: dict[str, Any], spans, derive: bool, extends: bool) -> None:
        """A call that starts from an empty cache; `extends`: it is the prompt of this generate() call plus
        the tokens generated so far, recomputed without a cache, so the prompt's cuts are reused."""
        mask, embeds = kwargs.get("attention_mask"), kwargs["inputs_embeds"]
        real = mask.sum(1).tolist() if mask is not None else [embeds.shape[1]] * embeds.shape[0]
        call = Call(kwargs, spans, embeds.shape[1], derive, Stats(seq_len={0: [int(n) for n in real]}))
        self.call = call
        if not spans:
            return
        call.stats.record("input", call.positions())
        call.stats.media = [[(s.kind, s.grid) for s in sample] for sample in spans]
        if extends:
            added = call.input_len - self.prompt.input_len
            call.given = {stage: s.extend(added) for stage, s in self.prompt.selections.items() if s is not None}
        elif self.generating:
            self.prompt = call
        for stage in self.stages:
            stage.prefill(call)

    def _loss(self, stock: Callable[..., torch.Tensor], *, logits: torch.Tensor, labels: torch.Tensor, **kwargs):
        """The model's loss with `labels` cut like the tokens: each kept position keeps its own next-token label."""
        kept = self.call.kept() if self.call is not None else None
        if kept is None or labels.shape[-1] == logits.shape[1]:
            return stock(logits=logits, labels=labels, **kwargs)
        if labels.shape[-1] != self.call.input_len or kwargs.get("shift_labels") is not None:
            raise ValueError(
                f"labels cover {labels.shape[-1]} positions but the inputs had {self.call.input_len}; pass labels "
                "aligned with input_ids (tokred cuts them with the vision tokens), not shift_labels"
            )
        index, valid = kept
        shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
        shifted = shifted.gather(1, index.to(labels.device)).masked_fill(~valid.to(labels.device), IGNORE)
        return stock(logits=logits, labels=shifted, shift_labels=shifted, **kwargs)
