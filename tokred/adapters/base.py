"""What every adapter answers: where the parts of a VLM are and where its vision tokens sit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from tokred import compat
from tokred.tokens import Selection, Span, sample_key

# (token count, token grid) of each image or video of a batch, in order; None: split by contiguous runs.
Media = list[tuple[int, tuple[int, int, int] | None]] | None

VISION_INPUTS = ("pixel_values", "pixel_values_videos", compat.PRE_ENCODED)


class Adapter:
    """Model-family answers. Subclasses set `family` and `model_classes` and override what differs."""

    family: ClassVar[str]  # the checkpoints' config.model_type
    model_classes: ClassVar[tuple[str, ...]]
    takes_video: ClassVar[bool] = True  # whether the family's processor and model accept videos
    recommended: ClassVar[str] = "fastv-50"  # the preset `tokred.patch(model)` applies
    lmms_base: ClassVar[str]  # the lmms-eval model class (on transformers) the plugin wraps for this family

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def outer(self) -> nn.Module:
        """The module that merges vision features into the embeddings and calls the LLM."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        return self.outer.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def vision_tower(self) -> nn.Module:
        """The vision encoder (where the encoder stage acts)."""
        return self.outer.vision_tower

    @property
    def vision_blocks(self) -> nn.ModuleList:
        """The vision encoder's transformer blocks, in order."""
        return self.vision_tower.encoder.layers

    @property
    def projector(self) -> nn.Module:
        """What turns vision features into LLM-width tokens (the projector or patch merger)."""
        return self.outer.multi_modal_projector

    def hidden_state_block(self, layer: int) -> int:
        """The tower block whose output is hidden state `layer` (0: the embeddings; negative: from the end)."""
        return layer - 1 if layer > 0 else len(self.vision_blocks) + layer

    def vision_feature_block(self) -> int:
        """The block whose output the projector takes, for the LLaVA families (``vision_feature_layer``; the last
        of a list)."""
        layer = self.model.config.vision_feature_layer
        return self.hidden_state_block(layer[-1] if isinstance(layer, (list, tuple)) else layer)

    def vision_attention(self, block: int) -> nn.Module:
        """The self-attention module of vision tower block `block`."""
        return self.vision_blocks[block].self_attn

    keep_calls = False
    """Set while an encoder signal is read, for adapters that must remember each tower call's grids."""

    encoder_cls: ClassVar[bool] = False
    """Whether the tower's first token is a [CLS] whose attention row ranks the others (else each token's score
    is the mean attention it receives)."""

    merges_in_tower: ClassVar[bool] = False
    """Whether the encoder stage merges between tower blocks (a plain ViT feeding the projector from one block,
    after `feature_skip` leading tokens); else it merges the tower's output tokens."""

    tower_tokens_are_llm_tokens: ClassVar[bool] = True
    """With `merges_in_tower`: whether the tower's tokens map one to one onto the LLM's (LLaVA), so the tower's
    groups are the LLM's; else (LLaVA-OneVision's packing and pooling) the tower's merges only save tower time,
    every token gets its group's row back at the projector's input, and the LLM's tokens merge after it."""

    patch_groups: ClassVar[bool] = False
    """Whether the tower takes a video as a flat list of patches grouped per LLM token (Qwen: 2x2 spatial
    merge of 2-frame temporal patches) and runs on any subset of whole groups, so the frames stage can encode
    only the groups that changed (`output_mergers` then give each group its row back)."""

    whole_frames: ClassVar[bool] = False
    """Whether the tower encodes a video's frames as a batch of whole images, each frame's tokens its own and then
    `trailing_video_tokens` closing ones (LLaVA-OneVision's SigLIP), so the frames stage can leave out the frames in
    which nothing changed (`frame_regions` says what each token stands for)."""

    trailing_video_tokens: ClassVar[int] = 0
    """With `whole_frames`: tokens after a video's frames' (LLaVA-OneVision: one newline)."""

    def frame_regions(self, arguments: dict[str, Any]) -> torch.Tensor:
        """With `whole_frames`: (videos, frames, tokens per frame, d), the pixels of each LLM token of the clips
        of one ``get_video_features`` call (its `arguments`)."""
        raise NotImplementedError

    @property
    def output_mergers(self) -> list[nn.Module]:
        """With `patch_groups`: the modules that turn the tower's patches into one row per group."""
        raise NotImplementedError

    def feature_block(self) -> int:
        """The tower block whose output the projector takes, for the LLaVA families (``vision_feature_layer``);
        refused where features come from several blocks."""
        layer = self.model.config.vision_feature_layer
        if isinstance(layer, (list, tuple)):
            raise ValueError(
                f"this model takes its image features from several tower layers {list(layer)}; tokred merges in "
                "towers that feed the projector from one"
            )
        return self.hidden_state_block(layer)

    @property
    def feature_skip(self) -> int:
        """How many leading tower tokens ([CLS]) the projector does not get, for the LLaVA families."""
        return int(self.model.config.vision_feature_select_strategy == "default")

    def encoder_attention_block(self) -> int | None:
        """The tower block whose attention is read as the encoder signal; None where tokred cannot map the tower's
        tokens to the LLM's (the signal is then refused with the families that have it)."""
        return None

    def encoder_token_scores(self, chunks: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        """(kind, the attention each of its LLM tokens received in the tower) per image or video the tower saw,
        in its order, from what the capture recorded per attention call of that block (`chunks`, (B, L) each)."""
        raise NotImplementedError

    def attention(self, layer: int) -> nn.Module:
        """The self-attention module of LLM layer `layer` (where the llm stage captures q/k)."""
        return self.layers[layer].self_attn

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    def token_ids(self) -> dict[str, int]:
        """Placeholder token id per kind of media."""
        ids = {"image": self.model.config.image_token_id}
        video = getattr(self.model.config, "video_token_id", None)
        if video is not None:
            ids["video"] = video
        return ids

    def media(self, kind: str, inputs: dict[str, Any]) -> Media:
        """Token count and grid of each image or video in the batch, where they can be known.

        Counts come from the encoded features when generate() encoded the media ahead of the prefill
        (newer transformers then drop the raw inputs), else from the family.
        """
        encoded = compat.encoded_media(inputs, kind)
        counts = [len(x) for x in encoded] if encoded is not None else self.token_counts(kind, inputs)
        if counts is None:
            return None
        return list(zip(counts, self.grids(kind, inputs, counts), strict=True))

    def token_counts(self, kind: str, inputs: dict[str, Any]) -> list[int] | None:
        """LLM tokens of each image or video, from the raw inputs; None: not known, split by runs."""
        return None

    def grids(self, kind: str, inputs: dict[str, Any], counts: list[int]) -> list[tuple[int, int, int] | None]:
        """The (t, h, w) token grid of each image or video, where the family makes it known."""
        return [None] * len(counts)

    def install(self) -> list[Callable[[], None]]:
        """Install what the family needs observed on every call; return the undo callbacks."""
        return []

    def spans(self, inputs: dict[str, Any]) -> list[list[Span]] | None:
        """Per-sample image/video spans from the outer model's inputs; None when the call carries no vision."""
        if not any(inputs.get(k) is not None for k in VISION_INPUTS):
            return None
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "tokred needs `input_ids` alongside pixel inputs to find each sample's vision tokens; "
                "pass input_ids rather than inputs_embeds"
            )
        spans: list[list[Span]] = [[] for _ in range(input_ids.shape[0])]
        for kind, token_id in self.token_ids().items():
            media = self.media(kind, inputs)
            queue = iter(media or ())
            for b in range(input_ids.shape[0]):
                positions = (input_ids[b] == token_id).nonzero()[:, 0]
                spans[b] += self._split(kind, positions, queue if media is not None else None)
        mask = inputs.get("attention_mask")
        for b, sample in enumerate(spans):
            sample.sort(key=lambda s: int(s.positions[0]))
            ids = input_ids[b] if mask is None else input_ids[b][mask[b].bool()]
            key = sample_key(ids)
            sample[:] = [replace(s, key=sample_key(torch.tensor([key, j]))) for j, s in enumerate(sample)]
        return spans if any(spans) else None

    @staticmethod
    def _split(kind: str, positions: torch.Tensor, queue) -> list[Span]:
        """Cut one sample's placeholder positions into media: by known counts, else by contiguous runs."""
        if queue is None:
            runs = torch.nonzero(positions.diff() != 1)[:, 0] + 1
            return [Span(kind, chunk) for chunk in positions.tensor_split(runs.tolist()) if chunk.numel()]
        out, start = [], 0
        while start < positions.numel():
            try:
                count, grid = next(queue)
            except StopIteration:
                raise ValueError(f"more {kind} tokens in input_ids than the {kind} grids account for") from None
            out.append(Span(kind, positions[start : start + count], grid))
            start += count
        return out

    def take_text_kwargs(self, kwargs: dict[str, Any], selection: Selection) -> None:
        """Cut family-specific LLM inputs that run along the sequence (e.g. Qwen3-VL deepstack), in place."""

    def inner_cut_hooks(self, current: Callable[[], Selection | None]) -> list[Callable[[], None]]:
        """Install what a cut inside the LLM needs beyond the layer hooks (extras the model adds along the
        sequence in later layers); `current()` is the cut in effect, if any. Returns the undo callbacks."""
        return []
