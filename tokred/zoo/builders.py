"""Offline builder of tiny random-weight VLM checkpoints.

Tests and examples need real ``transformers`` checkpoints (model, tokenizer, processor, chat
template) for each supported VLM family, but no model hub is reachable. :func:`build` makes one
locally in a few seconds: a byte-level BPE tokenizer trained on a tiny corpus, the family's
special tokens, a chat template that mirrors the real family's prompt format, small image/video
resolutions, and a randomly initialised float32 model. Everything is written with
``save_pretrained`` so that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it like a
hub checkpoint.

Sizes (defaults): text model hidden 64, 4 layers, 4 heads, 2 KV heads (GQA), MLP 128; vision
towers hidden 32 with 2-3 layers. Image/video token counts for the test inputs are listed in
each family's builder below.

Written against transformers 5.23 and checked with 5.17; version-dependent spots are commented.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipVisionConfig,
)

__all__ = ["FAMILIES", "MARKER", "build", "default_cache_dir"]

MARKER = ".tokred-build.json"
"""File written last into a finished build; its content decides whether a cached build is reused."""

_FORMAT = 1  # bump when the builders change in a way that invalidates cached checkpoints

# Text-model defaults shared by every family; ``build(**text)`` updates them.
_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------

# Words the BPE merges are trained on; anything else still encodes byte by byte.
_CORPUS = (
    "what which where how many is are was the a an of in on at to this that these there it "
    "colour color shape size circle square triangle rectangle star line dot object objects "
    "red green blue yellow white black orange purple grey gray pink brown "
    "image images picture photo video frame frames second seconds left right top bottom middle "
    "center big small large one two three four five six seven eight nine ten yes no not and or "
    "with without describe count answer question word you your helpful assistant user system "
    "please briefly short long first last next before after happens moving"
)


@dataclass(frozen=True)
class _TokenSpec:
    """Special tokens of a family, added in order after the BPE vocabulary.

    A ``bos`` token is prepended to every encoded sequence (Llama style); Qwen has none.
    """

    special: tuple[str, ...]
    eos: str
    pad: str
    bos: str | None = None
    unk: str | None = None


def _train_tokenizer(special_tokens: list[str], bos: str | None) -> Tokenizer:
    """Byte-level BPE over a tiny corpus: any text encodes without unknown tokens, decodes exactly.

    Training is deterministic (checked across processes), so equal seeds give equal checkpoints.
    """
    words = _CORPUS.split()
    words += [w.capitalize() for w in words]
    corpus = [" ".join(words)] * 4 + ["\n".join(words)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if bos is not None:  # Llama-style: prepend BOS to every sequence
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def _make_tokenizer(spec: _TokenSpec) -> PreTrainedTokenizerFast:
    """Wrap the trained tokenizer with the family's bos/eos/pad and left padding for generation."""
    # ``PreTrainedTokenizerFast`` is an alias of ``TokenizersBackend`` in transformers 5.x; the
    # saved tokenizer.json is what gets loaded back, so no family tokenizer class is needed.
    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(list(spec.special), spec.bos),
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=_TEXT_DEFAULTS["max_position_embeddings"],
    )


_QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_QWEN_TOKENS = _TokenSpec(special=_QWEN_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>")
_LLAVA_TOKENS = _TokenSpec(
    special=("<unk>", "<s>", "</s>", "<image>", "<pad>"),
    bos="<s>",
    eos="</s>",
    pad="<pad>",
    unk="<unk>",
)
_ONEVISION_TOKENS = _TokenSpec(special=(*_QWEN_SPECIAL, "<image>", "<video>"), eos="<|im_end|>", pad="<|endoftext|>")
_QWEN3_TOKENS = _TokenSpec(
    special=(*_QWEN_SPECIAL, "<tool_call>", "</tool_call>", "<think>", "</think>"),
    eos="<|im_end|>",
    pad="<|endoftext|>",
)

# --------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------


def _chat_template(*, turn_start: str, turn_end: str, image: str, video: str, generation_prompt: str) -> str:
    """Jinja chat template: content is a string or a list of image/video/text items, in order.

    Arguments are Jinja expressions (``message`` is the current message). Image and video items
    may be ``{"type": "image"}`` or carry an ``image``/``url``/``path`` key like hub templates.
    """
    return (
        "{%- for message in messages -%}"
        "{{- " + turn_start + " -}}"
        "{%- if message['content'] is string -%}{{- message['content'] -}}"
        "{%- else -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}{{- " + image + " -}}"
        "{%- elif item['type'] == 'video' or 'video' in item -%}{{- " + video + " -}}"
        "{%- elif 'text' in item -%}{{- item['text'] -}}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{- " + turn_end + " -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + generation_prompt + " -}}{%- endif -%}"
    )


def _chatml_template(image: str, video: str) -> str:
    r"""Qwen ChatML: ``<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n``.

    Unlike Qwen2-VL's hub template no default system prompt is inserted (Qwen3-VL has none).
    """
    return _chat_template(
        turn_start="'<|im_start|>' + message['role'] + '\\n'",
        turn_end="'<|im_end|>\\n'",
        image=image,
        video=video,
        generation_prompt="'<|im_start|>assistant\\n'",
    )


# LLaVA-1.5 (llava-hf): ``USER: <image>\nquestion ASSISTANT:`` (BOS comes from the tokenizer).
_LLAVA_TEMPLATE = _chat_template(
    turn_start="message['role'].upper() + ': '",
    turn_end="' '",
    image="'<image>\\n'",
    video="''",
    generation_prompt="'ASSISTANT:'",
)
_ONEVISION_TEMPLATE = _chatml_template("'<image>\\n'", "'<video>\\n'")
_QWEN_TEMPLATE = _chatml_template(
    "'<|vision_start|><|image_pad|><|vision_end|>'", "'<|vision_start|><|video_pad|><|vision_end|>'"
)

# --------------------------------------------------------------------------------------------
# per-family configs and processors
# --------------------------------------------------------------------------------------------


def _text_kwargs(tok: PreTrainedTokenizerFast, overrides: dict[str, Any]) -> dict[str, Any]:
    """Shared text-config kwargs: defaults, then caller overrides, with vocab and special ids."""
    kwargs = {**_TEXT_DEFAULTS, **overrides}
    kwargs.update(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return kwargs


def _head_dim(text: dict[str, Any]) -> int:
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def _mrope(text: dict[str, Any], *, hw_share: float, interleaved: bool) -> dict[str, Any]:
    """M-RoPE parameters: (t, h, w) sections summing to head_dim / 2, in the real models' ratios."""
    half = _head_dim(text) // 2
    hw = int(half * hw_share)
    rope = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": [half - 2 * hw, hw, hw],
    }
    if interleaved:
        rope["mrope_interleaved"] = True
    return rope


def _ids(tok: PreTrainedTokenizerFast, **tokens: str) -> dict[str, int]:
    return {key: tok.convert_tokens_to_ids(token) for key, token in tokens.items()}


_QWEN_VISION_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

# LLaVA: CLIP 56x56, patch 14 -> 16 patches + CLS; "default" strategy drops CLS -> 16 tokens.
_LLAVA_IMAGE = 56
_PATCH = 14
# The CLIP and SigLIP towers share one tiny size.
_TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def _llava_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """llava-hf 1.5 layout: CLIP vision tower (penultimate layer, CLS dropped) + Llama text."""
    tower = CLIPVisionConfig(
        **{
            **_TINY_VIT,
            "image_size": image_size or _LLAVA_IMAGE,
            "patch_size": _PATCH,
            "projection_dim": 32,
            "hidden_act": "quick_gelu",
            **vision,
        }
    )
    return LlavaConfig(
        vision_config=tower,
        text_config=LlamaConfig(**text),
        image_seq_length=(tower.image_size // tower.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        **_ids(tok, image_token_index="<image>"),
    )


def _llava_processor(tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None) -> ProcessorMixin:
    size, patch = config.vision_config.image_size, config.vision_config.patch_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tok,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, removed again by the "default" strategy
        chat_template=_LLAVA_TEMPLATE,
    )


# OneVision: SigLIP 56x56 tiles (16 tokens each). AnyRes picks a grid of up to 2x2 tiles, so a
# 112x112 image gives 16 (base) + 8*8 (tiles) + 8 (newlines) = 88 tokens, a 56x56 one 36 tokens;
# with several images per prompt each image is 16 + 1 tokens. Video frames are resized to 56x56
# and 2x2-pooled: N frames -> 4 * N + 1 tokens.
_OV_TILE = 56


def _pinpoints(tile: int) -> list[list[int]]:
    return [[tile * h, tile * w] for h in (1, 2) for w in (1, 2)]


def _onevision_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """llava-onevision layout: SigLIP (no head, last layer, all tokens) + Qwen2 text, AnyRes.

    ``image_size`` is the tile side (AnyRes grids of up to 2x2 tiles)."""
    tower = SiglipVisionConfig(
        **{**_TINY_VIT, "image_size": image_size or _OV_TILE, "patch_size": _PATCH, "vision_use_head": False, **vision}
    )
    return LlavaOnevisionConfig(
        vision_config=tower,
        text_config=Qwen2Config(**text),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=_pinpoints(tower.image_size),
        vision_aspect_ratio="anyres_max_9",
        **_ids(tok, image_token_index="<image>", video_token_index="<video>"),
    )


def _onevision_processor(
    tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None
) -> ProcessorMixin:
    tile, patch = config.vision_config.image_size, config.vision_config.patch_size
    size = {"height": tile, "width": tile}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=_pinpoints(tile)),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=tok,
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=_ONEVISION_TEMPLATE,
    )


# Qwen2-VL / Qwen2.5-VL: patch 14, 2x2 merge -> one token per 28x28 pixels; temporal patch 2.
# Images are resized to 56x56 .. 224x224 (4 .. 64 tokens; 112x112 -> 16 tokens; ``image_size``
# raises the upper side), video frames to at most 112x112 (N frames of 112x112 -> N/2 * 16 tokens;
# with ``image_size`` at most half its side, so 448 px images take 224 px MotionVQA frames whole).
_QWEN2_FACTOR = 28


def _qwen2_vl_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """Qwen2-VL: ViT with 2D RoPE and patch merger; Qwen2 text with M-RoPE (t:h:w = 2:3:3)."""
    tower = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": text["hidden_size"],  # merger output = LLM width
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": _PATCH,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        **vision,
    }
    text = {**text, "rope_parameters": _mrope(text, hw_share=3 / 8, interleaved=False)}
    return Qwen2VLConfig(text_config=text, vision_config=tower, **_ids(tok, **_QWEN_VISION_IDS))


# The Qwen2.5-VL and Qwen3-VL towers share one tiny size (the merger's output is the LLM width).
_QWEN_TOWER = {
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def _qwen2_5_vl_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """Qwen2.5-VL: as Qwen2-VL plus windowed vision attention.

    ``window_size`` is in pixels: 56 px = 2x2 merged tokens per window, so a 112x112 image has
    four windows. Blocks 0-1 use window attention, block 2 (the last) full attention, like the
    real model's "every 8th block full".
    """
    tower = {
        **_QWEN_TOWER,
        "out_hidden_size": text["hidden_size"],
        "patch_size": _PATCH,
        "window_size": 2 * _QWEN2_FACTOR,
        "fullatt_block_indexes": [2],
        "tokens_per_second": 2,
        **vision,
    }
    text = {**text, "rope_parameters": _mrope(text, hw_share=3 / 8, interleaved=False)}
    return Qwen2_5_VLConfig(text_config=text, vision_config=tower, **_ids(tok, **_QWEN_VISION_IDS))


def _qwen2_processor(
    cls: type[ProcessorMixin], tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None
) -> ProcessorMixin:
    f = _QWEN2_FACTOR
    side = (image_size or 8 * f) // f
    image_size = {"shortest_edge": 4 * f * f, "longest_edge": side * side * f * f}
    video_size = {"shortest_edge": 4 * f * f, "longest_edge": max(4, side // 2) ** 2 * f * f}  # per frame
    return cls(
        image_processor=Qwen2VLImageProcessor(size=image_size, patch_size=_PATCH, merge_size=2, temporal_patch_size=2),
        # Frames are used as given (no fps sampling), like the real checkpoints. Since ~5.20 an
        # unset ``cap_pixels_per_frame`` warns; 5.17 lacks it here and keeps it as an attribute.
        video_processor=Qwen2VLVideoProcessor(
            size=video_size,
            patch_size=_PATCH,
            merge_size=2,
            temporal_patch_size=2,
            do_sample_frames=False,
            cap_pixels_per_frame=False,
        ),
        tokenizer=tok,
        chat_template=_QWEN_TEMPLATE,
    )


# Qwen3-VL: patch 16, 2x2 merge -> one token per 32x32 pixels. Images 64x64 .. 256x256 (4 .. 64
# tokens; 112x112 rounds to 128x128 -> 16 tokens). The video pixel budget covers all frames: up
# to 128 * 32 * 32 pixel-frames (8 frames of 112x112 -> 128x128 -> 4 * 16 = 64 tokens).
_QWEN3_PATCH = 16
_QWEN3_FACTOR = 32


def _qwen3_vl_config(
    tok: PreTrainedTokenizerFast, text: dict[str, Any], vision: dict[str, Any], image_size: int | None
) -> PreTrainedConfig:
    """Qwen3-VL: ViT with learned + 2D RoPE positions and DeepStack; Qwen3 text, interleaved M-RoPE.

    DeepStack taps vision blocks 0 and 1 of 3 and adds them to LLM layers 0 and 1.
    """
    tower = {
        **_QWEN_TOWER,
        "out_hidden_size": text["hidden_size"],
        "patch_size": _QWEN3_PATCH,
        "num_position_embeddings": 64,  # 8x8 learned grid, interpolated to each image's grid
        "deepstack_visual_indexes": [0, 1],
        **vision,
    }
    text = {**text, "head_dim": _head_dim(text)}
    text["rope_parameters"] = _mrope(text, hw_share=5 / 16, interleaved=True)
    return Qwen3VLConfig(text_config=text, vision_config=tower, **_ids(tok, **_QWEN_VISION_IDS))


def _qwen3_vl_processor(
    tok: PreTrainedTokenizerFast, config: PreTrainedConfig, image_size: int | None
) -> ProcessorMixin:
    f = _QWEN3_FACTOR
    side = (image_size or 8 * f) // f
    norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    patches = {"patch_size": _QWEN3_PATCH, "merge_size": 2, "temporal_patch_size": 2}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 4 * f * f, "longest_edge": side * side * f * f}, **norm, **patches
        ),
        # Frames are used as given (the real checkpoint samples 2 fps); the processor then writes
        # "<t seconds>" timestamps assuming 24 fps unless ``video_metadata`` is passed.
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": 8 * f * f, "longest_edge": 128 * f * f},
            do_sample_frames=False,
            cap_pixels_per_frame=False,
            **norm,
            **patches,
        ),
        tokenizer=tok,
        chat_template=_QWEN_TEMPLATE,
    )


@dataclass(frozen=True)
class _Family:
    tokens: _TokenSpec
    config: Callable[[PreTrainedTokenizerFast, dict[str, Any], dict[str, Any], int | None], PreTrainedConfig]
    processor: Callable[[PreTrainedTokenizerFast, PreTrainedConfig, int | None], ProcessorMixin]


_REGISTRY: dict[str, _Family] = {
    "llava": _Family(_LLAVA_TOKENS, _llava_config, _llava_processor),
    "llava_onevision": _Family(_ONEVISION_TOKENS, _onevision_config, _onevision_processor),
    "qwen2_vl": _Family(_QWEN_TOKENS, _qwen2_vl_config, partial(_qwen2_processor, Qwen2VLProcessor)),
    "qwen2_5_vl": _Family(_QWEN_TOKENS, _qwen2_5_vl_config, partial(_qwen2_processor, Qwen2_5_VLProcessor)),
    "qwen3_vl": _Family(_QWEN3_TOKENS, _qwen3_vl_config, _qwen3_vl_processor),
}

FAMILIES: tuple[str, ...] = tuple(_REGISTRY)
"""Supported families: ``("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")``."""

# --------------------------------------------------------------------------------------------
# building and caching
# --------------------------------------------------------------------------------------------


def cache_root() -> pathlib.Path:
    """tokred's cache: ``$TOKRED_CACHE``, default ``~/.cache/tokred`` (zoo builds, generated task data)."""
    return pathlib.Path(os.environ.get("TOKRED_CACHE") or pathlib.Path.home() / ".cache" / "tokred").expanduser()


def default_cache_dir(family: str, seed: int = 0, overrides: dict[str, Any] | None = None) -> pathlib.Path:
    """Cache location: ``$TOKRED_CACHE/zoo/<family>-s<seed>`` (default root ``~/.cache/tokred``).

    Builds with overrides get a short hash suffix so they never collide with the default build.
    """
    name = f"{family}-s{seed}"
    if overrides:
        blob = json.dumps(overrides, sort_keys=True, default=str).encode()
        name += f"-{hashlib.sha1(blob).hexdigest()[:8]}"
    return cache_root() / "zoo" / name


def _marker(family: str, seed: int, overrides: dict[str, Any]) -> dict[str, Any]:
    return {
        "family": family,
        "seed": seed,
        "overrides": json.loads(json.dumps(overrides, sort_keys=True, default=str)),
        "transformers": transformers.__version__,
        "format": _FORMAT,
    }


def _is_complete(path: pathlib.Path, marker: dict[str, Any]) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == marker
    except (OSError, ValueError):
        return False


def _write(family: str, path: pathlib.Path, seed: int, overrides: dict[str, Any]) -> None:
    """Build every artefact of one checkpoint into ``path``; the marker file goes last."""
    (path / MARKER).unlink(missing_ok=True)  # an interrupted rebuild must not look complete
    spec = _REGISTRY[family]
    tok = _make_tokenizer(spec.tokens)
    image_size = overrides.get("image_size")
    config = spec.config(tok, _text_kwargs(tok, overrides.get("text", {})), overrides.get("vision", {}), image_size)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)  # safetensors is the default format
    spec.processor(tok, config, image_size).save_pretrained(path)  # tokenizer, image/video processor, chat template
    (path / MARKER).write_text(json.dumps(_marker(family, seed, overrides), indent=2) + "\n")


def build(
    family: str,
    path: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    vision: dict[str, Any] | None = None,
    image_size: int | None = None,
    **text: Any,
) -> pathlib.Path:
    """Write a tiny random-weight checkpoint of ``family`` into ``path`` and return the path.

    Args:
        family: one of :data:`FAMILIES`.
        path: output directory (created; existing files are overwritten). ``None`` uses
            :func:`default_cache_dir` and reuses a complete earlier build made with the same
            family, seed, overrides and transformers version.
        seed: ``torch.manual_seed`` used before the random initialisation.
        vision: vision-tower config fields, e.g. ``{"depth": 4, "hidden_size": 96}`` (Qwen) or
            ``{"patch_size": 28}`` (CLIP/SigLIP).
        image_size: largest image side the processor keeps (Qwen families; default 224, Qwen3-VL
            256), or the tower's input side (LLaVA) / tile side (LLaVA-OneVision; default 56).
        **text: text-model config fields, e.g. ``num_hidden_layers=6`` or ``hidden_size=128``
            (the vision towers' output width and the M-RoPE sections follow ``hidden_size`` and
            the head size).

    Raises:
        ValueError: unknown ``family``.
    """
    if family not in _REGISTRY:
        raise ValueError(f"unknown VLM family {family!r}; known families: {', '.join(FAMILIES)}")
    parts = {"text": text, "vision": vision, "image_size": image_size}
    overrides = {key: value for key, value in parts.items() if value}
    if path is not None:
        out = pathlib.Path(path)
        _write(family, out, seed, overrides)
        return out

    out = default_cache_dir(family, seed, overrides)
    marker = _marker(family, seed, overrides)
    if _is_complete(out, marker):
        return out
    # Build next to the target and move it in, so concurrent builders never see half a checkpoint.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write(family, tmp, seed, overrides)
        if out.exists() and not _is_complete(out, marker):
            shutil.rmtree(out, ignore_errors=True)  # stale: other version, overrides or unfinished
        try:
            tmp.rename(out)
        except OSError:
            if not _is_complete(out, marker):  # lost a race to a builder of something else
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
