"""The training curriculum's aids: symbolic vision tokens built from the scene, and the hooks that use them.

A from-scratch VLM learns slowly end to end: the LLM must learn to route from a question to the tokens of the
object it names while the tower is still learning to see. The curriculum splits that:

1. ``symbolic``: the LLM alone learns on clean symbols: each vision token is, in place of the tower's
   features (the tower does not run; positions and masks are the model's own), the sum of learned vectors for
   the colour, shape and quadrant of the object painting its cell (a learned background vector otherwise;
   the quadrant only where the tower can see it, `Symbols`).
   (Tying the symbols to the question words' own embeddings was tried and stalled near the answer prior.)
2. ``align``: the tower and projector learn to produce those symbols from pixels (the LLM is frozen), each
   factor (colour, shape, quadrant) weighed alike (`Symbols.align_loss`).
3. ``joint``: the whole model fine-tunes on the answer loss from pixels.

The symbols are a training aid only: the saved model is the stock architecture and sees pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from tokred import compat
from tokred.adapters.base import Adapter
from tokred.zoo.datasets.cells import owners
from tokred.zoo.datasets.common import COLOURS, SHAPES
from tokred.zoo.datasets.shapes import QUADRANTS, quadrant

STAGES = ("symbolic", "align", "joint")


class Symbols(nn.Module):
    """Symbolic vision tokens for a batch of scenes: per cell, the sum of learned vectors for the colour,
    shape and (with `quadrant`) quadrant of the object painting it, or a learned background vector.

    The symbols hold what the tower can see in a cell. A tower with absolute position embeddings (CLIP,
    SigLIP, Qwen3-VL) can tell where a patch sits; Qwen2-VL's and Qwen2.5-VL's towers are rotary only, so
    their features cannot say where a patch is (at 224 px Qwen2.5-VL's four windows are the four quadrants,
    each computed alike); their LLM must read the quadrant from its M-RoPE positions, which it learns in the
    symbolic stage when the symbols leave it out (`quadrant_seen`): the shipped Qwen2.5-VL learned top/bottom,
    not yet left/right (see `tokred.zoo.families.base.mrope`)."""

    def __init__(self, width: int, quadrant: bool = True) -> None:
        super().__init__()
        self.with_quadrant = quadrant
        self.colour = nn.Embedding(len(COLOURS), width)
        self.shape = nn.Embedding(len(SHAPES), width)
        self.quadrant = nn.Embedding(len(QUADRANTS), width)
        self.background = nn.Parameter(torch.zeros(width))
        for table in (self.colour, self.shape, self.quadrant):
            nn.init.normal_(table.weight, std=0.02)

    def rows(self, record: dict, grid: tuple[int, int, int], size: int) -> torch.Tensor:
        """(t*h*w, d) one scene's symbols, in raster order of its token grid."""
        owner = torch.from_numpy(owners(record, grid, size))
        slots = grid[1] * grid[2]
        index = torch.zeros(len(owner), 3, dtype=torch.long)
        for token in (owner >= 0).nonzero()[:, 0].tolist():
            o = record["objects"][owner[token]]
            cx, cy = o["track"][2 * (token // slots)] if "track" in o else (o["cx"], o["cy"])
            index[token] = torch.tensor(
                [
                    list(COLOURS).index(o["colour"]),
                    SHAPES.index(o["shape"]),
                    QUADRANTS.index(quadrant(cx, cy, size)),
                ]
            )
        index = index.to(self.background.device)
        objects = self.colour(index[:, 0]) + self.shape(index[:, 1])
        if self.with_quadrant:
            objects = objects + self.quadrant(index[:, 2])
        return torch.where((owner >= 0).to(index.device)[:, None], objects, self.background)

    def batch(self, records: list[dict], grids: list[tuple[int, int, int]], size: int) -> torch.Tensor:
        """(tokens, d) the symbols of a batch, in sequence order (each medium's tokens in raster order)."""
        return torch.cat([self.rows(r, g, size) for r, g in zip(records, grids, strict=True)])

    def align_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Relative squared error of the tower's rows `out` (tokens, d) against their symbols `target`, plus, per
        factor (colour, shape, quadrant), the squared error within the span of its vectors relative to their
        mean squared norm. The symbolic stage leaves the quadrant vectors a few times smaller than the colour
        ones; under the overall error alone the tower learned colour and shape and dropped the quadrant
        (answers fell to its prior). Per factor, dropping any one costs alike."""
        loss = F.mse_loss(out, target) / target.pow(2).mean()
        for table in (self.colour, self.shape, self.quadrant)[: 2 + self.with_quadrant]:
            vectors = table.weight.detach().float()
            basis = torch.linalg.qr(vectors.T).Q  # (d, values): orthonormal, spanning the factor's vectors
            loss = loss + ((out - target) @ basis).pow(2).sum(-1).mean() / vectors.pow(2).sum(-1).mean()
        return loss


def quadrant_seen(family: str) -> bool:
    """Whether `family`'s vision tower has absolute position embeddings, so its features can carry a quadrant."""
    return family not in ("qwen2_vl", "qwen2_5_vl")


def vision_mask(adapter: Adapter, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the positions of image and video placeholder tokens."""
    ids = torch.tensor(list(adapter.token_ids().values()), device=input_ids.device)
    return torch.isin(input_ids, ids)


@contextmanager
def symbolic_inputs(adapter: Adapter, rows: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Inside the block, the model's image and video features are `rows()` (the batch's vision tokens in
    sequence order) and its vision tower never runs; everything else (positions, masks, decode steps) is the
    model's own."""
    undo = [compat.given_media_features(adapter.outer, kind, rows) for kind in adapter.token_ids()]
    try:
        yield
    finally:
        for handle in undo:
            handle()


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


PROBE = "tokred_curriculum_probe"
"""The attention function name under which supervised layers record their post-RoPE queries and keys."""


def _probe(module, query, key, value, attention_mask, **kwargs):
    """Record q/k for the attention loss, then run the layer's own kernel unchanged."""
    module._tokred_probe.append((query, key, kwargs.get("scaling")))
    return compat.stock_attention(module, module._tokred_stock_config, query, key, value, attention_mask, **kwargs)


compat.register_attention(PROBE, _probe)


@contextmanager
def recorded_attention(adapter: Adapter, layers: list[int]) -> Iterator[list[list[tuple]]]:
    """Inside the block, each forward of the given LLM layers appends (query, key, scaling) to its list."""
    records: list[list[tuple]] = []
    undo = []
    for layer in layers:
        attention = adapter.attention(layer)
        stock = attention.config
        attention._tokred_stock_config, attention._tokred_probe = stock, []
        attention.config = compat.with_attention_function(stock, PROBE)
        records.append(attention._tokred_probe)
        undo.append((attention, stock))
    try:
        yield records
    finally:
        for attention, stock in undo:
            attention.config = stock
            del attention._tokred_stock_config, attention._tokred_probe


def attention_loss(
    records: list[list[tuple]], queries: list[tuple[int, int, torch.Tensor]], padding: torch.Tensor | None
) -> torch.Tensor:
    """Mean over recorded layers and `queries` (sample, query position, target key positions) of
    -log(attention mass of head 0 on the targets): teaches the token before each answer to look at the
    objects its question names."""
    losses = []
    for calls in records:
        query, key, scaling = calls[-1]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        for b, position, targets in queries:
            scores = (key[b, 0, : position + 1].float() @ query[b, 0, position].float()) * scale
            if padding is not None:
                scores = scores.masked_fill(~padding[b, : position + 1].bool(), float("-inf"))
            mass = scores.softmax(-1)[targets.to(scores.device)].sum()
            losses.append(-torch.log(mass + 1e-6))
    return torch.stack(losses).mean() if losses else torch.zeros(())
