"""The encoder stage: merge vision tokens inside the vision tower, so its later blocks run on fewer.

Where the family's tower is a plain ViT whose tokens map one to one onto the LLM's (LLaVA's CLIP), tokred
merges between blocks: each block up to the one the projector reads records its keys (head mean) through a
registered attention function that then runs the stock kernel; the next block's forward pre-hook merges by
them and passes the blocks after it the log of each token's size as an additive attention bias (proportional
attention). At the projector's input the rest of the budget is merged and every token gets its group's row
back, so the model's own code (placeholder counts, projector, scatter into the sequence) runs unchanged; the
prefill then keeps one token per group, at its surviving token's position, as the pre_llm stage cuts.
LLaVA-OneVision's SigLIP merges between blocks alike, but its LLM tokens are not its tower tokens one to one
(anyres packing, video pooling): there the merges save tower time only, the restored rows go through the
model's own packing, and the LLM's budget is merged at its input as below (rows of one tower group are equal,
so they fold together first). Qwen towers (whole 2x2 merger groups and attention windows) merge their output
tokens at the LLM's input only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.methods.base import EncoderMerger
from tokred.stages.base import runtime
from tokred.stages.call import Call
from tokred.stages.pre_llm import PreLLMStage
from tokred.tokens import Folded, Merge, Selection, Span

KEYS = "tokred_tower_keys"
UNSUPPORTED = ("flash_attention_2", "flash_attention_3")  # proportional attention needs an additive bias


def _keys(module, query, key, value, attention_mask, **kwargs):
    """Attention function of a merging block: note its keys (head mean), then run the stock kernel."""
    tower: TowerMerge = module._tokred_tower
    tower.keys[module._tokred_block] = key.float().mean(1)
    stock = tower.stock_configs[module._tokred_block]
    return compat.stock_attention(module, stock, query, key, value, attention_mask, **kwargs)


compat.register_attention(KEYS, _keys)


@dataclass
class Pass:
    """One tower forward's merge state: each current token's size, and where the original tokens went."""

    sizes: torch.Tensor  # (B, N) how many original tokens each current one stands for
    into: torch.Tensor  # (B, N0) the current slot of each original token
    origin: torch.Tensor  # (B, N) the original index of each current token


class TowerMerge:
    """Merges between the blocks of a plain ViT; `take` hands a prefill the groups of its images."""

    def __init__(self, method: EncoderMerger, adapter: Adapter) -> None:
        self.method, self.adapter = method, adapter
        self.last = adapter.feature_block()
        self.skip = adapter.feature_skip
        blocks = range(self.last + 1)
        self.stock_configs = {j: adapter.vision_attention(j).config for j in blocks}
        self.implementation = compat.attention_implementation(self.stock_configs[0])
        if self.implementation in UNSUPPORTED:
            raise ValueError(
                f"{type(method).__name__} merges inside the vision tower with proportional attention, which needs "
                f"an additive attention bias; the tower runs {self.implementation!r} (use sdpa or eager there)"
            )
        self.keys: dict[int, torch.Tensor] = {}
        self.state: Pass | None = None
        self.carries = adapter.tower_tokens_are_llm_tokens  # whether `take` hands the tower's groups on
        self.pending: list[Merge] = []  # per image the tower saw, in order: its groups in LLM token indices

    def install(self) -> list[Callable[[], None]]:
        undo: list[Callable[[], None]] = []
        for j, stock in self.stock_configs.items():
            attention = self.adapter.vision_attention(j)
            attention.config = compat.with_attention_function(stock, KEYS)
            attention._tokred_tower, attention._tokred_block = self, j
            undo.append(lambda a=attention, c=stock: _restore(a, c))
        for j, block in enumerate(self.adapter.vision_blocks):
            undo.append(block.register_forward_pre_hook(self._before_block(j), with_kwargs=True).remove)
        undo.append(self.adapter.projector.register_forward_pre_hook(self._before_projector).remove)
        return undo

    def _before_block(self, j: int):
        def hook(module, args: tuple, kwargs: dict[str, Any]):
            hidden_in_kwargs = not args
            hidden = kwargs["hidden_states"] if hidden_in_kwargs else args[0]
            if j == 0:
                batch, n = hidden.shape[:2]
                index = torch.arange(n, device=hidden.device).expand(batch, -1)
                self.state = Pass(torch.ones(batch, n, device=hidden.device), index, index)
                return None
            if j <= self.last:  # merge points left: this one, the blocks up to the projector's, the output
                hidden = self._merge(hidden, self.keys[j - 1], self._target(hidden.shape[1], self.last - j + 2))
            sizes = self.state.sizes
            if bool((sizes == 1).all()):
                return None
            bias = sizes.log().to(hidden.dtype)[:, None, None, :]  # proportional attention
            if hidden_in_kwargs:
                kwargs["hidden_states"] = hidden
                kwargs["attention_mask"] = bias
                return args, kwargs
            return (hidden, bias, *args[2:]), kwargs

        return hook

    def _target(self, n: int, points: int) -> int:
        """How many of the n current tokens to leave at this merge point: an even share of what must still go
        over the `points` merge points left (this one included)."""
        k = self.method.budget(self.state.into.shape[1] - self.skip) + self.skip
        return n - (n - k) // points

    def _merge(self, hidden: torch.Tensor, metric: torch.Tensor, k: int) -> torch.Tensor:
        state = self.state
        if k >= hidden.shape[1]:
            return hidden
        merged, sizes, into, origin = self.method.reduce(hidden, metric, state.sizes, k, self.adapter.encoder_cls)
        self.state = Pass(sizes, into.gather(1, state.into), state.origin.gather(1, origin))
        return merged

    def _before_projector(self, module, args: tuple):
        """The tower's features, merged: the rest of the budget merged, then every token given its group's row."""
        (features, *rest) = args
        state, skip = self.state, self.skip
        if state is None or features.shape[1] != state.origin.shape[1] - skip:
            raise RuntimeError("the projector got features the merging tower did not produce")
        metric = self.keys[self.last][:, skip:]
        n = state.into.shape[1] - skip
        k = self.method.budget(n)
        merged, _, into, origin = self.method.reduce(
            features, metric, state.sizes[:, skip:], k, self.adapter.encoder_cls and not skip
        )
        groups = into.gather(1, state.into[:, skip:] - skip)  # (B, n): each LLM token's group
        if self.carries:
            survivors = (state.origin[:, skip:] - skip).gather(1, origin)  # (B, k) LLM index of each group's token
            self.pending += [Merge(s, m, g) for s, m, g in zip(survivors, merged, groups, strict=True)]
        self.state = None
        return (merged.gather(1, groups[..., None].expand(-1, -1, merged.shape[-1])), *rest)

    def take(self, spans: list[list[Span]], embeds: torch.Tensor, mask: torch.Tensor | None) -> Selection | None:
        """The cut of a prefill whose images the tower merged: one token per group (its row is the group's)."""
        merges, self.pending = self.pending, []
        wanted = sum(len(sample) for sample in spans)
        if len(merges) != wanted:
            raise RuntimeError(f"the merging tower saw {len(merges)} images; the prompt holds {wanted}")
        keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        folded, queue = [], iter(merges)
        for b, sample in enumerate(spans):
            for span in sample:
                merge = next(queue)
                merge = Merge(
                    merge.index, embeds[b, span.positions[merge.index.to(span.positions.device)]], merge.groups
                )
                merge.check(len(span), len(merge.index), embeds.shape[-1])
                keep[b, span.positions] = False
                keep[b, span.positions[merge.index.to(span.positions.device)]] = True
                folded.append(Folded.of(b, span.positions, merge))
        return Selection.from_keep(keep, mask, tuple(folded))


def _restore(attention: torch.nn.Module, stock: Any) -> None:
    attention.config = stock
    del attention._tokred_tower, attention._tokred_block


@runtime
class EncoderStage(PreLLMStage):
    """Merges in the tower where the family allows it (`Adapter.merges_in_tower`); the LLM's tokens are the
    tower's groups where they map one to one (`Adapter.tower_tokens_are_llm_tokens`), else merged at its input."""

    name = "encoder"

    def __init__(self, method: EncoderMerger, adapter: Adapter, current: Callable[[], Call | None]) -> None:
        super().__init__(method, adapter, current)
        self.tower = TowerMerge(method, adapter) if adapter.merges_in_tower else None
        self.carried = self.tower is not None and self.tower.carries

    def install(self) -> list[Callable[[], None]]:
        return super().install() + (self.tower.install() if self.tower is not None else [])

    def records(self, call: Call) -> Any:
        if not self.carried:
            return super().records(call)
        kwargs = call.kwargs
        return self.tower.take(call.spans, kwargs["inputs_embeds"], kwargs.get("attention_mask"))

    def select(self, call: Call, records: Any) -> Selection | None:
        return records if self.carried else super().select(call, records)
