"""What the zoo's family builders share: the tokenizer, chat templates, config helpers and the registry.

A family file describes its checkpoint as a ``Builder`` and registers it under the family name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedConfig, PreTrainedTokenizerFast, ProcessorMixin

from tokred.zoo.datasets import ANSWERS

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

# Words the BPE merges are trained on (with every task answer, so that each answer is one token); anything else
# still encodes byte by byte.
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
class TokenSpec:
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
    words = list(dict.fromkeys(_CORPUS.split() + sorted({a for answers in ANSWERS.values() for a in answers})))
    words += [w.capitalize() for w in words]
    corpus = [" ".join(words)] * 4 + ["\n".join(words)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    if bos is not None:  # Llama-style: prepend BOS to every sequence
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return tok


def make_tokenizer(spec: TokenSpec) -> PreTrainedTokenizerFast:
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


QWEN_SPECIAL = (
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

# --------------------------------------------------------------------------------------------
# chat templates
# --------------------------------------------------------------------------------------------


def chat_template(*, turn_start: str, turn_end: str, image: str, video: str, generation_prompt: str) -> str:
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


def chatml_template(image: str, video: str) -> str:
    r"""Qwen ChatML: ``<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n``.

    Unlike Qwen2-VL's hub template no default system prompt is inserted (Qwen3-VL has none).
    """
    return chat_template(
        turn_start="'<|im_start|>' + message['role'] + '\\n'",
        turn_end="'<|im_end|>\\n'",
        image=image,
        video=video,
        generation_prompt="'<|im_start|>assistant\\n'",
    )


QWEN_TEMPLATE = chatml_template(
    "'<|vision_start|><|image_pad|><|vision_end|>'", "'<|vision_start|><|video_pad|><|vision_end|>'"
)

# --------------------------------------------------------------------------------------------
# config helpers and shared sizes
# --------------------------------------------------------------------------------------------


def text_kwargs(tok: PreTrainedTokenizerFast, overrides: dict[str, Any]) -> dict[str, Any]:
    """Shared text-config kwargs: defaults, then caller overrides, with vocab and special ids."""
    kwargs = {**_TEXT_DEFAULTS, **overrides}
    kwargs.update(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return kwargs


def head_dim(text: dict[str, Any]) -> int:
    """Attention head size: ``head_dim`` if set, else hidden size over heads."""
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def mrope(text: dict[str, Any], *, hw_share: float, interleaved: bool) -> dict[str, Any]:
    """M-RoPE parameters: (t, h, w) sections summing to head_dim / 2, in the real models' ratios.

    Sections in a row (Qwen2/2.5-VL) give w the lowest frequencies: at the real base 1e6 and 16 frequency pairs
    they turn under 0.002 rad across an 8-token row, and a shipped model trained so read top/bottom from M-RoPE
    (93 % right) but not left/right (61 %), nor after 30 more minutes at base 100 (52 %); new builds take base
    100 (w turns 0.1-0.45 rad across the row) so that a model trained from scratch can. Interleaved sections
    (Qwen3-VL) keep 1e6."""
    half = head_dim(text) // 2
    hw = int(half * hw_share)
    rope = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0 if interleaved else 100.0,
        "mrope_section": [half - 2 * hw, hw, hw],
    }
    if interleaved:
        rope["mrope_interleaved"] = True
    return rope


def ids(tok: PreTrainedTokenizerFast, **tokens: str) -> dict[str, int]:
    """Config fields naming token ids: each keyword's token converted to its id."""
    return {key: tok.convert_tokens_to_ids(token) for key, token in tokens.items()}


QWEN_VISION_IDS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

# ViT patch side of every family but Qwen3-VL.
PATCH = 14
# The CLIP and SigLIP towers share one tiny size.
TINY_VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}

# The Qwen2.5-VL and Qwen3-VL towers share one tiny size (the merger's output is the LLM width).
QWEN_TOWER = {
    "depth": 3,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}

# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Builder:
    """How to build one family's checkpoint: its special tokens, model config and processor.

    ``config(tok, text, vision, image_size)`` gets the text kwargs and vision-tower overrides;
    ``processor(tok, config, image_size)`` carries the tokenizer and the chat template.
    """

    tokens: TokenSpec
    config: Callable[[PreTrainedTokenizerFast, dict[str, Any], dict[str, Any], int | None], PreTrainedConfig]
    processor: Callable[[PreTrainedTokenizerFast, PreTrainedConfig, int | None], ProcessorMixin]


BUILDERS: dict[str, Builder] = {}
"""Family name -> its builder, in registration (import) order."""


def register(family: str, builder: Builder) -> None:
    """Make ``family`` buildable with ``builder``; family files call this when imported."""
    BUILDERS[family] = builder
