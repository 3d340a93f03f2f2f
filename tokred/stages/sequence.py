"""Shortening a batch of sequences consistently: hidden states, positions, masks and later decode steps.

A `Selection` says which positions of each sample survive. Samples may keep different counts; the shorter
ones are padded to the batch's longest with dropped positions that stay masked out ("filler"), so one
rectangular tensor carries the batch and no sample attends to anything it dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tokred.methods.base import Span


@dataclass(frozen=True)
class Selection:
    index: torch.Tensor  # (B, M) long, ascending positions into the old sequence
    key_valid: torch.Tensor  # (B, M) bool: False for filler, the slots that keep the batch rectangular
    has_filler: bool
    old_len: int

    @classmethod
    def from_keep(cls, keep: torch.Tensor, padding_mask: torch.Tensor | None) -> Selection | None:
        """Build from a (B, N) bool mask of kept positions and the 2D padding mask the model received.

        None when every position stays, so the call is left untouched. Otherwise padding goes with the
        dropped tokens: it was masked out anyway, and the batch gets narrower.
        """
        if keep.all():
            return None
        if padding_mask is not None:
            keep = keep & padding_mask[:, : keep.shape[1]].bool()
        counts = keep.sum(1)
        width = int(counts.max())
        dropped_rank = (~keep).cumsum(1)
        take = keep | (~keep & (dropped_rank <= (width - counts)[:, None]))
        index = take.nonzero()[:, 1].view(keep.shape[0], width)
        kept = keep.gather(1, index)
        return cls(index, kept, bool((counts < width).any()), keep.shape[1])

    def extend(self, added: int) -> Selection:
        """The same cut of a sequence that grew by `added` tokens at its end, all of them kept."""
        if added == 0:
            return self
        batch, device = self.index.shape[0], self.index.device
        tail = torch.arange(self.old_len, self.old_len + added, device=device).expand(batch, added)
        valid = torch.ones(batch, added, dtype=torch.bool, device=device)
        return Selection(
            torch.cat([self.index, tail], 1),
            torch.cat([self.key_valid, valid], 1),
            self.has_filler,
            self.old_len + added,
        )

    @property
    def new_len(self) -> int:
        return self.index.shape[1]

    def take(self, x: torch.Tensor, seq_dim: int, batch_dim: int) -> torch.Tensor:
        """Gather the kept positions of `x` along `seq_dim`; a size-1 batch dim is broadcast first."""
        batch = self.index.shape[0]
        if x.shape[batch_dim] != batch:
            x = x.expand(*[batch if d == batch_dim % x.ndim else -1 for d in range(x.ndim)])
        shape = [1] * x.ndim
        shape[batch_dim], shape[seq_dim] = batch, self.new_len
        idx = self.index.view(shape).expand(
            *[self.new_len if d == seq_dim % x.ndim else s for d, s in enumerate(x.shape)]
        )
        return x.gather(seq_dim, idx)

    def take_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, ...) -> (B, M, ...)."""
        return self.take(x, seq_dim=1, batch_dim=0)

    def take_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """(B, N), (1, N) or (R, B, N) position ids -> the kept columns, batch made explicit."""
        return self.take(position_ids, seq_dim=-1, batch_dim=-2)

    def padding_mask(self, mask: torch.Tensor | None, added: int = 0) -> torch.Tensor:
        """The 2D padding mask after the cut: the kept positions, then the `added` tokens decoded since.

        Always a tensor: with no mask at all, transformers would read the gaps in the kept positions as
        packed sequences.
        """
        kept = self.key_valid.to(mask.dtype if mask is not None else torch.long)
        if not added:
            return kept
        extra = mask[:, self.old_len :] if mask is not None else kept.new_ones(kept.shape[0], added)
        return torch.cat([kept, extra], dim=1)

    def take_visual(
        self, visual_pos_masks: torch.Tensor, embeds: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Cut a (B, N) mask of visual positions and the per-visual-token rows that go with it (deepstack)."""
        rank = visual_pos_masks.flatten().long().cumsum(0).view_as(visual_pos_masks) - 1
        new_mask = self.take_hidden(visual_pos_masks)
        rows = self.take_hidden(rank)[new_mask]
        return new_mask, [e[rows.to(e.device)] for e in embeds]

    def remap(self, spans: list[list[Span]]) -> list[list[Span]]:
        """The same spans over the new sequence, holding only the positions that survived."""
        slots = torch.arange(self.new_len, device=self.index.device).expand_as(self.index)
        new_at = torch.full((self.index.shape[0], self.old_len), -1, dtype=torch.long, device=self.index.device)
        new_at.scatter_(1, self.index, torch.where(self.key_valid, slots, -1))
        out = []
        for b, sample in enumerate(spans):
            moved = [new_at[b, span.positions] for span in sample]
            out.append([replace(s, positions=m[m >= 0]) for s, m in zip(sample, moved, strict=True)])
        return out
