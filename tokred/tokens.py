"""The small types every layer shares: where vision tokens sit, what a method sees, and which survive a cut.

Adapters, methods, kernels-callers and stages all import this module; it imports nothing of tokred's.
`Selection` says which positions of each sample survive. Samples may keep different counts; the shorter
ones are padded to the batch's longest with dropped positions that stay masked out ("filler"), so one
rectangular tensor carries the batch and no sample attends to anything it dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class Span:
    """One image or video of one sample: where its tokens sit in the sequence and its token grid."""

    kind: str  # "image" or "video"
    positions: torch.Tensor  # (n,) long, ascending positions in the current sequence
    grid: tuple[int, int, int] | None = None  # (t, h, w) of the tokens as the LLM sees them, when known
    key: int = 0  # fixed by the sample's tokens and the span's place among them; see `sample_key`

    def __len__(self) -> int:
        return int(self.positions.numel())

    def generator(self, seed: int) -> torch.Generator:
        """A generator for content-blind choices in this span: the same for the same sample, alone or batched."""
        digest = hashlib.blake2b(f"{seed}:{self.key}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def sample_key(token_ids: torch.Tensor) -> int:
    """A stable number for one sample's unpadded input_ids, so its random choices don't depend on its batch."""
    data = token_ids.detach().to("cpu", torch.int64).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class VisionTokens:
    """What a method may look at for one span: its embeddings, the sample's text at the same point and, inside
    the LLM, what layer K's attention saw."""

    span: Span
    embeds: torch.Tensor  # (n, d) hidden states of the span's tokens at the stage's point
    scores: torch.Tensor | None = None  # (n,) attention from the last text query, where the stage provides it
    key_norms: torch.Tensor | None = None  # (n,) L2 norm of each token's keys at layer K (all heads), ditto
    context: torch.Tensor | None = None  # (m, d) the sample's text tokens (no media, no padding), as `embeds`
    encoder_scores: torch.Tensor | None = None  # (n,) attention each token received in the vision tower
    text_attention: torch.Tensor | None = None  # (m, n) each `context` token's attention onto the span at layer K


@dataclass(frozen=True)
class Merge:
    """What a merging method returns for one span: the tokens whose slots survive, the rows they carry
    instead of their own, and which surviving token each of the span's tokens went into."""

    index: torch.Tensor  # (k,) long, ascending indices into the span of the tokens whose slots survive
    rows: torch.Tensor  # (k, d) the rows those slots carry (e.g. the mean of their group)
    groups: torch.Tensor  # (n,) long in [0, k): the surviving slot each token was merged into

    def check(self, n: int, k: int, width: int) -> None:
        """ValueError unless this is a well-formed merge of n tokens into k rows of `width`."""
        index, groups = self.index.cpu(), self.groups.cpu()
        if index.shape != (k,) or bool((index.diff() <= 0).any()) or bool(((index < 0) | (index >= n)).any()):
            problem = f"index must be {k} ascending indices below {n}, got {index.tolist()}"
        elif tuple(self.rows.shape) != (k, width):
            problem = f"rows must have shape ({k}, {width}), got {tuple(self.rows.shape)}"
        elif groups.shape != (n,) or bool(((groups < 0) | (groups >= k)).any()):
            problem = f"groups must be {n} slots in [0, {k}), got {groups.tolist()}"
        elif not torch.equal(groups[index], torch.arange(k)):
            problem = "each surviving token must be in its own group"
        else:
            return
        raise ValueError(f"a merge returned a malformed result: {problem}")


@dataclass(frozen=True)
class Folded:
    """One span's merge as a cut carries it, in positions of the sequence being cut."""

    sample: int
    slots: torch.Tensor  # (k,) positions whose rows are replaced
    rows: torch.Tensor  # (k, d) the rows they carry
    members: torch.Tensor  # (n,) positions of the span's tokens
    into: torch.Tensor  # (n,) the position of the slot each of them went into

    @classmethod
    def of(cls, sample: int, positions: torch.Tensor, merge: Merge) -> Folded:
        """`merge` of the span at `positions` of `sample`."""
        slots = positions[merge.index.to(positions.device)]
        return cls(sample, slots, merge.rows, positions, slots[merge.groups.to(positions.device)])


@dataclass(frozen=True)
class Selection:
    index: torch.Tensor  # (B, M) long, ascending positions into the old sequence
    key_valid: torch.Tensor  # (B, M) bool: False for filler, the slots that keep the batch rectangular
    has_filler: bool
    old_len: int
    merged: tuple[Folded, ...] = ()  # merges: rows that replace the hidden states at kept positions

    @classmethod
    def from_keep(
        cls,
        keep: torch.Tensor,
        padding_mask: torch.Tensor | None,
        merged: tuple[Folded, ...] = (),
    ) -> Selection | None:
        """Build from a (B, N) bool mask of kept positions, the 2D padding mask the model received and the
        rows merges put at kept positions.

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
        return cls(index, kept, bool((counts < width).any()), keep.shape[1], merged)

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
            self.merged,
        )

    def then(self, later: Selection) -> Selection:
        """This cut followed by `later` (a cut of the sequence this one leaves), as one cut of the original
        sequence; the merges' rows are not carried (it says where tokens went, not what they hold)."""
        return Selection(self.index.gather(1, later.index), later.key_valid, later.has_filler, self.old_len)

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

    def cut_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, N, d) hidden states -> (B, M, d): merged rows written in at their positions, then the kept taken."""
        if self.merged:
            hidden = hidden.clone()
            for fold in self.merged:
                hidden[fold.sample, fold.slots.to(hidden.device)] = fold.rows.to(hidden)
        return self.take_hidden(hidden)

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
