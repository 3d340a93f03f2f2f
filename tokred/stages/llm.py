"""The llm stage: after layer K, drop vision tokens from the hidden states and from later layers' cache.

The signal is captured inside layer K's attention call: tokred registers an attention function that
records the post-RoPE q/k rows it needs and then calls the model's own kernel (sdpa, flash, eager) with
the same arguments, so the model never switches to eager attention and no layer runs twice. Layers after
K get their hidden states, mask and rotary embeddings cut by a forward pre-hook.

A method may cut after several layers (`LLMReducer.cuts`, e.g. PyramidDrop): each cut acts on the sequence
the previous one left, and the layers between two cuts get the first one's mask and rotary embeddings. In
`stats`, the last cut is stage "llm" and each earlier one "llm@K".
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.kernels import last_query_attention, rows_attention
from tokred.methods.base import LLMReducer
from tokred.stages.base import Stage, runtime
from tokred.stages.call import KEY_NORMS, LAST_QUERY, TEXT_ATTENTION, Call
from tokred.stages.select import choose, text_positions
from tokred.tokens import Selection

CAPTURE = "tokred_capture"
SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def _capture(module, query, key, value, attention_mask, **kwargs):
    """Attention function for layer K: note q/k for the stage, then run the stock kernel unchanged."""
    stage: LLMStage = module._tokred_stage
    stage.observe(module._tokred_step, query, key, kwargs.get("scaling"))
    return compat.stock_attention(
        module, stage.stock_configs[module._tokred_step], query, key, value, attention_mask, **kwargs
    )


compat.register_attention(CAPTURE, _capture)


@dataclass
class Pass:
    """The llm stage's values for one call: the sequence as the first cut layer sees it and the cuts made."""

    text_mask: torch.Tensor | None  # the LLM's 2D padding mask (after any earlier stage's cut)
    seq_len: int  # the prefill's length at the stage's first layer
    made: list[Selection | None] = field(default_factory=list)  # each cut made so far (None: it kept all)
    entered: list[list[int]] = field(default_factory=list)  # tokens of each sample's spans as the stage began
    active: bool = True  # False once every cut turned out to keep everything
    pending: set[int] = field(default_factory=set)  # cuts whose first later layer still has to work out its changes
    override: dict[int, dict[str, Any]] = field(default_factory=dict)  # cut -> what the layers after it get
    added: int = 0  # tokens decoded since the prefill

    def length(self) -> int:
        """The prefill's length after the cuts made so far."""
        cut = [s for s in self.made if s is not None]
        return cut[-1].new_len if cut else self.seq_len

    def mask(self) -> torch.Tensor | None:
        """The prefill's 2D padding mask after the cuts made so far."""
        cut = [s for s in self.made if s is not None]
        return cut[-1].key_valid.long() if cut else self.text_mask

    def composite(self) -> Selection | None:
        """The cuts made so far as one cut of the stage's input (without their merges)."""
        cut = [s for s in self.made if s is not None]
        return functools.reduce(Selection.then, cut) if cut else None


@runtime
class LLMStage(Stage):
    name = "llm"

    def __init__(self, method: LLMReducer, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        super().__init__(method, adapter, current)
        if not isinstance(method, LLMReducer):
            raise TypeError(f"a method of the llm stage must be an LLMReducer, not {type(method).__name__}")
        depth = len(adapter.layers)
        self.layers = method.cuts(depth)
        if not all(0 <= layer < depth - 1 for layer in self.layers):
            name = "layer" if hasattr(method, "layer") else "layers"  # the field that says where it cuts
            raise ValueError(
                f"{type(method).__name__}.{name}={getattr(method, name)} is out of range for this model's {depth} "
                f"LLM layers; allowed: 0 to {depth - 2} (tokens are dropped after the layer)"
            )
        self.implementation = compat.attention_implementation(adapter.text_config)
        if self.implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"the llm stage supports attn_implementation {', '.join(SUPPORTED_ATTENTION)}; "
                f"this model uses {self.implementation!r}"
            )
        self.stock_configs = [adapter.attention(layer).config for layer in self.layers]
        self.names = [f"{self.name}@{k}" for k in self.layers[:-1]] + [self.name]  # each cut's name in stats

    # -- installation -------------------------------------------------------------------------------
    def install(self) -> list[Callable[[], None]]:
        undo = []
        for step, layer in enumerate(self.layers):
            attn, stock = self.adapter.attention(layer), self.stock_configs[step]
            attn.config = compat.with_attention_function(stock, CAPTURE)
            attn._tokred_stage, attn._tokred_step = self, step
            undo.append(functools.partial(_restore, attn, stock))
        for index in range(self.layers[0] + 1, len(self.adapter.layers)):
            step = sum(k < index for k in self.layers) - 1  # the last cut before this layer
            hook = functools.partial(self._before_layer, step=step)
            undo.append(self.adapter.layers[index].register_forward_pre_hook(hook, with_kwargs=True).remove)

        def cut() -> Selection | None:
            state = self._state()
            return state.composite() if state is not None else None

        undo += self.adapter.inner_cut_hooks(cut)
        return undo

    def _state(self) -> Pass | None:
        """This stage's values for the call in flight, while its cuts are (or may still be) in effect."""
        call = self.current()
        state = call.state.get(self.name) if call is not None else None
        return state if state is not None and state.active else None

    # -- per call -----------------------------------------------------------------------------------
    def prefill(self, call: Call) -> None:
        """Remember the mask, length and span sizes as the LLM sees them; the cuts happen after their layers."""
        kwargs = call.kwargs
        entered = [[len(span) for span in sample] for sample in call.spans]
        call.state[self.name] = Pass(
            kwargs.get("attention_mask"),
            kwargs["inputs_embeds"].shape[1],
            entered=entered,
            pending=set(range(len(self.layers))),
        )

    def decode(self, call: Call) -> None:
        """The LLM's mask and how many tokens followed the prefill, to carry across the cuts."""
        state = call.state.get(self.name)
        if state is None or not state.active:
            return
        state.text_mask = call.kwargs.get("attention_mask")
        state.added = call.seen + call.kwargs["inputs_embeds"].shape[1] - state.seq_len
        state.pending = set(range(len(state.made)))

    def observe(self, step: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
        """The attention call of the layer cut `step` follows, on a prefill: the last text query's attention
        over the keys, and each position's key norm."""
        state, call = self._state(), self.current()
        if state is None or self.names[step] in call.given or len(state.made) != step:
            return
        length = state.length()
        if query.shape[2] != length:
            return
        batch, mask = query.shape[0], state.mask()
        if mask is None:
            last = torch.full((batch,), length - 1, device=query.device)
        else:
            last = (mask.bool() * torch.arange(length, device=query.device)).argmax(1)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        call.signals[LAST_QUERY] = last_query_attention(query, key, last, mask, scale)
        call.signals[KEY_NORMS] = key.float().square().sum((1, 3)).sqrt()
        if self.method.needs_text_attention:
            call.signals[TEXT_ATTENTION] = rows_attention(query, key, self._text_rows(call, mask, length), mask, scale)

    def _text_rows(self, call: Call, mask: torch.Tensor | None, length: int) -> torch.Tensor:
        """(B, T) each sample's text positions, padded with -1."""
        device = call.kwargs["inputs_embeds"].device
        rows = [
            text_positions(sample, length, None if mask is None else mask[b], device)
            for b, sample in enumerate(call.spans)
        ]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)

    def _before_layer(self, module, args: tuple, kwargs: dict[str, Any], step: int):
        """Pre-hook of every layer after the first cut (`step`: the last cut before it); the first one after
        each cut works out, once per forward, what the layers up to the next cut get."""
        state = self._state()
        if state is None:
            return None
        hidden_in_kwargs = not args
        hidden = kwargs["hidden_states"] if hidden_in_kwargs else args[0]
        if step in state.pending:
            state.pending.discard(step)
            if len(state.made) == step:
                selection = self._choose(step, state, hidden)
                state.override[step] = self._cut(step, state, selection, kwargs, hidden.dtype)
                if selection is None and all(s is None for s in state.made) and len(state.made) == len(self.layers):
                    state.active = False  # every token stays: leave this call untouched
                    return None
                if selection is not None:
                    hidden = selection.cut_hidden(hidden)
            else:
                state.override[step] = self._carry(step, state, kwargs)
        kwargs.update(state.override.get(step, {}))
        if hidden_in_kwargs:
            kwargs["hidden_states"] = hidden
            return args, kwargs
        return (hidden, *args[1:]), kwargs

    def _choose(self, step: int, state: Pass, hidden: torch.Tensor) -> Selection | None:
        """Prefill: cut `step`'s tokens (or the prompt's, when reused), recorded in the call."""
        call, name = self.current(), self.names[step]
        if name in call.given:
            selection = call.given[name]
        else:
            signals, method, progress = call.signals, self.method, (step + 1) / len(self.layers)
            selection = choose(
                method,
                call.spans,
                hidden,
                state.mask(),
                signals.get(LAST_QUERY),
                signals.get(KEY_NORMS),
                text_attention=signals.get(TEXT_ATTENTION),
                count=lambda b, s, tokens: method.count_at(progress, tokens, state.entered[b][s]),
            )
        state.made.append(selection)
        call.cut(name, selection, layer=self.layers[step] + 1)
        return selection

    def _cut(
        self, step: int, state: Pass, selection: Selection | None, kwargs: dict[str, Any], dtype: torch.dtype
    ) -> dict[str, Any]:
        """Prefill: the mask and rotary embeddings of the layers after cut `step`."""
        before = state.override.get(step - 1, {})
        if selection is None:
            return before
        mask = None
        if kwargs.get("attention_mask") is not None or any(s is not None and s.has_filler for s in state.made):
            mask = compat.attention_mask(selection.key_valid, selection.new_len, self.implementation, dtype)
        cos, sin = before.get("position_embeddings", kwargs["position_embeddings"])
        return {
            "attention_mask": mask,
            "position_embeddings": (selection.take_hidden(cos), selection.take_hidden(sin)),
            "position_ids": None,  # only flash attention reads them, to detect packing; cut positions look packed
        }

    def _carry(self, step: int, state: Pass, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decode step: the layers after cut `step` get the same mask over their shorter cache."""
        made = [s for s in state.made[: step + 1] if s is not None]
        if not made:
            return {}
        key_valid = state.text_mask
        for selection in made:
            key_valid = selection.padding_mask(key_valid, state.added)
        key_valid, cos = key_valid.bool(), kwargs["position_embeddings"][0]
        filler = any(s.has_filler for s in made)
        if kwargs.get("attention_mask") is None and not filler and bool(key_valid.all()):
            return {}
        return {"attention_mask": compat.attention_mask(key_valid, cos.shape[1], self.implementation, cos.dtype)}


def _restore(attention: torch.nn.Module, stock: Any) -> None:
    attention.config = stock
    del attention._tokred_stage, attention._tokred_step
