"""`Call`: what one prompt's forward (and its decode steps) carries between the stages.

The session opens a Call at each prefill; stages read the LLM's keyword arguments from it, record their
cuts in it (which remaps the spans, extends the chain of index maps back to `input_ids` and fills the
stats), post signals a later stage may read (`signals`, named below) and keep their own per-call values
under `state[stage name]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokred.stats import Stats
from tokred.tokens import Folded, Selection, Span

LAST_QUERY = "last_query"
"""Signal: (B, N) attention of each sample's last text query over the sequence at the llm stage's layer K."""
KEY_NORMS = "key_norms"
"""Signal: (B, N) L2 norm of each position's keys (all heads) at the llm stage's layer K; rotary embeddings
leave it unchanged, so it does not depend on a token's absolute position (or its batch's padding)."""
TEXT_ATTENTION = "text_attention"
"""Signal, for methods that ask (`LLMReducer.needs_text_attention`): (B, T, N) attention of each sample's text
tokens (`stages.select.text_positions` order; rows past a sample's count are 0) over the sequence at layer K."""


@dataclass
class Call:
    kwargs: dict[str, Any]  # the LLM forward's keyword arguments, updated in place by the stages
    spans: list[list[Span]] | None  # each sample's images and videos, over the sequence as it is now
    input_len: int  # the sequence length the LLM was given
    derive_positions: bool  # the model derives decode positions from the cache length (no mask, no ids)
    stats: Stats
    seen: int = 0  # cache length at the current forward (0 for the prefill)
    llm_len: int = 0  # the length the LLM's first layer took at the prefill, after the cuts before it
    given: dict[str, Selection | None] = field(default_factory=dict)  # cuts to reuse instead of choosing
    selections: dict[str, Selection | None] = field(default_factory=dict)  # each stage's cut, None: kept all
    maps: list[torch.Tensor] = field(default_factory=list)  # each cut's index, oldest first
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # what a stage measured, for later ones
    state: dict[str, Any] = field(default_factory=dict)  # per-stage values for this call

    def cut(self, stage: str, selection: Selection | None, layer: int = 0) -> None:
        """Record `stage`'s cut, taking effect from LLM layer `layer` on."""
        self.selections[stage] = selection
        if selection is not None:
            self.stats.record_groups(stage, len(self.spans), [self._merged_groups(f) for f in selection.merged])
            self.spans = selection.remap(self.spans)
            self.maps.append(selection.index)
            self.stats.seq_len[layer] = selection.key_valid.sum(1).tolist()
        self.stats.record(stage, self.positions())

    def positions(self) -> list[torch.Tensor]:
        """Each sample's vision positions now, carried back through the cuts to `input_ids` positions."""
        out = []
        for b, sample in enumerate(self.spans):
            pos = torch.cat([s.positions for s in sample]) if sample else torch.zeros(0, dtype=torch.long)
            out.append(self._to_input(b, pos))
        return out

    def _to_input(self, sample: int, positions: torch.Tensor) -> torch.Tensor:
        """Positions of the sequence as it is now -> `input_ids` positions."""
        for index in reversed(self.maps):
            positions = index[sample][positions]
        return positions

    def _merged_groups(self, fold: Folded) -> tuple[int, list[torch.Tensor]]:
        """(sample, the `input_ids` positions of each group of two or more tokens that `fold` merged into one)."""
        members, into = self._to_input(fold.sample, fold.members), self._to_input(fold.sample, fold.into)
        groups = [members[into == slot] for slot in into.unique()]
        return fold.sample, [g for g in groups if len(g) > 1]

    def kept(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For each position the LLM's output has now: its `input_ids` position and whether it is real (not
        filler); None when nothing was cut."""
        if not self.maps:
            return None
        index = self.maps[0]
        for later in self.maps[1:]:
            index = index.gather(1, later)
        last = next(s for s in reversed(self.selections.values()) if s is not None)
        return index, last.key_valid
