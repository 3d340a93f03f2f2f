"""The training curriculum's aids: symbolic vision tokens built from the scene, and the hooks that use them.

A from-scratch VLM learns slowly end to end: the LLM must learn to route from a question to the tokens of the
object it names while the tower is still learning to see. The curriculum splits that:

1. ``symbolic``: the LLM alone learns on clean symbols: each vision token's embedding is replaced, at the
   LLM's input (positions and masks are the model's own), by the sum of the input embeddings of the colour,
   shape and quadrant words of the object painting its cell (zero for background).
   Tying the symbols to the words the questions use lets a question token find its object in one hop.
2. ``align``: the tower and projector learn to produce those symbols from pixels (the LLM is frozen).
3. ``joint``: the whole model fine-tunes on the answer loss from pixels.

The symbols are a training aid only: the saved model is the stock architecture and sees pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.zoo.datasets.cells import owners

STAGES = ("symbolic", "align", "joint")


def quadrant_word(cx: float, cy: float, size: int) -> str:
    return ("top" if cy < size / 2 else "bottom") + ("left" if cx < size / 2 else "right")


class Symbols:
    """Symbolic vision tokens for a batch of scenes, from the model's own (trainable) input embeddings."""

    def __init__(self, embeddings: nn.Embedding, tokenizer) -> None:
        self.embeddings, self.tokenizer = embeddings, tokenizer
        self._ids: dict[str, torch.Tensor] = {}

    def word(self, word: str) -> torch.Tensor:
        """The mean input embedding of the word's tokens (with a leading space, as inside a sentence)."""
        if word not in self._ids:
            ids = self.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            self._ids[word] = torch.tensor(ids, device=self.embeddings.weight.device)
        return self.embeddings(self._ids[word]).mean(0)

    def rows(self, record: dict, grid: tuple[int, int, int], size: int) -> torch.Tensor:
        """(t*h*w, d) one scene's symbols: colour + shape + quadrant of the object painting each cell, else 0."""
        owner = owners(record, grid, size)
        out = torch.zeros(len(owner), self.embeddings.embedding_dim, device=self.embeddings.weight.device)
        slots = grid[1] * grid[2]
        for token in (owner >= 0).nonzero()[0].tolist():
            o = record["objects"][owner[token]]
            cx, cy = o["track"][2 * (token // slots)] if "track" in o else (o["cx"], o["cy"])
            out[token] = self.word(o["colour"]) + self.word(o["shape"]) + self.word(quadrant_word(cx, cy, size))
        return out

    def batch(self, records: list[dict], grids: list[tuple[int, int, int]], size: int) -> torch.Tensor:
        """(tokens, d) the symbols of a batch, in sequence order (each medium's tokens in raster order)."""
        return torch.cat([self.rows(r, g, size) for r, g in zip(records, grids, strict=True)])


def vision_mask(adapter: Adapter, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the positions of image and video placeholder tokens."""
    ids = torch.tensor(list(adapter.token_ids().values()), device=input_ids.device)
    return torch.isin(input_ids, ids)


@contextmanager
def symbolic_inputs(adapter: Adapter, rows: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block, the LLM's input embeddings at the vision positions of each prefill are `rows()` (in
    sequence order); everything else (positions, masks, decode steps) is what the model computed."""
    vision: list[torch.Tensor] = []

    def read(module, args, kwargs):
        vision[:] = [vision_mask(adapter, compat.forward_arguments(module, args, kwargs)["input_ids"])]

    def replace(_module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        if vision and vision[0].shape == embeds.shape[:2] and vision[0].any():
            kwargs["inputs_embeds"] = embeds.masked_scatter(vision[0][..., None], rows().to(embeds))
        return args, kwargs

    handles = [
        adapter.outer.register_forward_pre_hook(read, with_kwargs=True),
        adapter.language_model.register_forward_pre_hook(replace, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class _Captured(Exception):
    """Raised by the capture hook to stop a forward once the LLM's inputs are known."""


def vision_rows(model: nn.Module, adapter: Adapter, inputs: dict) -> torch.Tensor:
    """(tokens, d) the LLM's input embeddings at the vision positions, in sequence order: what the tower and
    projector made of `inputs`, without running the LLM (the forward stops at its door)."""
    seen = []

    def capture(_module, args, kwargs):
        seen.append(kwargs["inputs_embeds"])
        raise _Captured

    handle = adapter.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        model(**inputs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError("the model's forward never reached its language model")
    return seen[0][vision_mask(adapter, inputs["input_ids"]).to(seen[0].device)]
