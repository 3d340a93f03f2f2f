"""Every place tokred reaches into transformers internals, one function per seam.

tokred hooks the models rather than forking them, so it depends on names and call shapes that transformers
does not promise to keep. Each seam is named here (SEAMS); when a release moves one, the function for it
raises `SeamError` naming the seam instead of letting a hook read None and carry on. `tests/test_compat.py`
checks every seam on every family's tiny checkpoint, so a new release fails there first, by name.

Tested: transformers 5.17 to 5.25 (pyproject caps the range). Announced removals handled here:
- 5.24 renamed the cache argument ``past_key_values`` to ``cache`` in every forward and in generate's model
  kwargs (old keyword accepted by a decorator until 5.40; ``generate(past_key_values=)`` until 6.0) and the
  output field likewise: `cache_argument` reads the name from the forward's signature, `output_cache` the field.
- 5.24 deprecated ``image_hidden_states``/``video_hidden_states`` on LLaVA outputs (a list per layer from 5.30):
  tokred does not read them.
"""

from __future__ import annotations

import copy
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
import transformers.cache_utils
from torch import nn
from transformers import AttentionInterface, Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

SEAMS = (
    "cache argument",
    "cache layer",
    "output cache",
    "forward arguments",
    "attention implementation",
    "attention registry",
    "eager attention",
    "media features",
    "pre encoded media",
    "vision window index",
    "vision block call",
    "onevision layout",
    "deepstack",
    "loss function",
    "mask format",
    "decode mask",
    "attention output",
)
"""The seams, as named in SeamError messages and in tests/test_compat.py."""

CACHE_NAMES = ("cache", "past_key_values")
"""The cache argument of model, layer and attention forwards: newest name first (``cache`` since 5.24)."""


class SeamError(RuntimeError):
    """transformers no longer has what tokred reaches for at one of its seams."""

    def __init__(self, seam: str, detail: str) -> None:
        import transformers

        super().__init__(
            f"transformers {transformers.__version__} moved tokred's seam {seam!r}: {detail}. "
            "tokred is tested with the range pyproject.toml declares; see tokred/compat.py"
        )
        self.seam = seam


# -- the cache ----------------------------------------------------------------------------------------
def cache_argument(module: nn.Module) -> str:
    """The keyword under which `module.forward` receives the KV cache."""
    parameters = inspect.signature(module.forward).parameters
    name = next((n for n in CACHE_NAMES if n in parameters), None)
    if name is None:
        raise SeamError("cache argument", f"{type(module).__name__}.forward takes none of {', '.join(CACHE_NAMES)}")
    return name


def passed_cache(kwargs: dict[str, Any], name: str) -> Cache | None:
    """The cache a forward pre-hook was given: under `name`, or a deprecated alias the forward still accepts.

    A cache under any other keyword means transformers renamed the argument again: tokred would take every
    decode step for a new prefill, so that is an error, not a silent None.
    """
    stray = [key for key, value in kwargs.items() if key not in CACHE_NAMES and isinstance(value, Cache)]
    if stray:
        raise SeamError("cache argument", f"the cache arrived as {stray[0]!r}; tokred reads {', '.join(CACHE_NAMES)}")
    cache = next((kwargs[n] for n in (name, *CACHE_NAMES) if kwargs.get(n) is not None), None)
    if cache is not None and not isinstance(cache, Cache):
        raise SeamError(
            "cache argument", f"the cache argument holds a {type(cache).__name__}, not a transformers Cache"
        )
    return cache


def output_cache(output: Any) -> Cache | None:
    """The cache a forward or generate() returned (field ``cache`` since 5.24, ``past_key_values`` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    name = next((n for n in CACHE_NAMES if n in fields), None)
    if name is None:
        raise SeamError("output cache", f"{type(output).__name__} has no field {' or '.join(CACHE_NAMES)}")
    return output.get(name)


def cache_layer() -> type:
    """The base class of one layer of a transformers `Cache` (`CacheLayerMixin`), which tokred's KV cache extends."""
    base = getattr(transformers.cache_utils, "CacheLayerMixin", None)
    if not isinstance(base, type):
        raise SeamError("cache layer", "transformers.cache_utils has no CacheLayerMixin")
    return base


# -- calls ----------------------------------------------------------------------------------------------
def forward_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward pre-hook's positional and keyword arguments by parameter name (generate passes keywords)."""
    if not args:
        return kwargs
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError as error:
        raise SeamError("forward arguments", f"{type(module).__name__}.forward: {error}") from error


def replaced_arguments(module: nn.Module, args: tuple, kwargs: dict[str, Any], **values: Any) -> tuple[tuple, dict]:
    """A forward pre-hook's return value that calls `module` with the named arguments replaced by `values`: every
    argument as a keyword (``**kwargs`` the forward collects passed on as they came)."""
    arguments = dict(forward_arguments(module, args, kwargs))
    for name, parameter in inspect.signature(module.forward).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
            raise SeamError("forward arguments", f"{type(module).__name__}.forward got extra positional arguments")
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    arguments.pop("args", None)
    return (), arguments | values


# -- attention ------------------------------------------------------------------------------------------
def attention_implementation(config: Any) -> str:
    """The attention kernel a (text) config selects: "sdpa", "eager", "flash_attention_2", ..."""
    implementation = getattr(config, "_attn_implementation", None)
    if not isinstance(implementation, str):
        raise SeamError(
            "attention implementation", f"{type(config).__name__}._attn_implementation is {implementation!r}"
        )
    return implementation


def with_attention_function(config: Any, name: str) -> Any:
    """A shallow copy of `config` whose layers call the registered attention function `name`."""
    if not hasattr(config, "_attn_implementation_internal"):
        raise SeamError("attention implementation", f"{type(config).__name__} has no _attn_implementation_internal")
    patched = copy.copy(config)
    patched._attn_implementation_internal = name
    return patched


def register_attention(name: str, function: Callable) -> None:
    """Make `function` selectable as attention implementation `name` (transformers' AttentionInterface)."""
    AttentionInterface.register(name, function)


def attention_kernel(module: nn.Module, implementation: str) -> Callable:
    """The function an attention module of this model calls for `implementation` (eager: its module's own)."""
    if implementation == "eager":
        kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if kernel is None:
            raise SeamError("eager attention", f"{type(module).__module__} defines no eager_attention_forward")
        return kernel
    if implementation not in ALL_ATTENTION_FUNCTIONS:
        raise SeamError("attention registry", f"no attention function registered as {implementation!r}")
    return ALL_ATTENTION_FUNCTIONS[implementation]


def stock_attention(module: nn.Module, stock_config: Any, *args, **kwargs) -> Any:
    """Run `module`'s own attention kernel (that of `stock_config`'s implementation) on the attention function's
    arguments, with `stock_config` in place while it runs: what a capturing attention function calls once it
    has noted what it needs, so the model's own kernel does the work."""
    patched, module.config = module.config, stock_config
    try:
        return attention_kernel(module, attention_implementation(stock_config))(module, *args, **kwargs)
    finally:
        module.config = patched


def attention_mask(key_valid: torch.Tensor, q_len: int, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A causal mask over the last `q_len` queries in the format the layers get for `implementation`.

    sdpa (and the kernels that read its format) take a bool (B, 1, q, kv) mask, eager an additive float one,
    flash attention the 2D key mask. Every query may at least see itself, so a padded row never softmaxes
    over nothing.
    """
    if implementation.startswith("flash"):
        return key_valid
    kv = key_valid.shape[1]
    query_at = torch.arange(kv - q_len, kv, device=key_valid.device)[:, None]
    keys = torch.arange(kv, device=key_valid.device)[None, :]
    mask = (key_valid[:, None, None, :] & (keys <= query_at)) | (keys == query_at)
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def decode_key_mask(attention_mask: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
    """(batch, keys) bool, True where one decode query may attend, from the mask a layer hands its attention
    function: sdpa's bool (B, 1, 1, kv) mask, eager's additive float one (0 where allowed, the dtype's min where
    not), flash attention's 2D key mask; None where the layer got none (every key)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[-2] == 1:
        row = attention_mask[:, 0, -1, :]
        allowed = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    elif attention_mask.dim() == 2:
        allowed = attention_mask.bool()
    else:
        raise SeamError("decode mask", f"a one-query step's mask is {tuple(attention_mask.shape)}, not 4D or 2D")
    if allowed.shape[-1] < keys:
        raise SeamError("decode mask", f"the mask covers {allowed.shape[-1]} keys, the layer holds {keys}")
    return allowed[:, :keys].expand(batch, keys)


def attention_output(output: torch.Tensor) -> tuple[torch.Tensor, None]:
    """What an attention function returns for attention `output` (B, heads, q, D): (B, q, heads, D) contiguous,
    which the module reshapes to its hidden size, and no attention weights (as sdpa's and flash's give)."""
    return output.transpose(1, 2).contiguous(), None


# -- media ----------------------------------------------------------------------------------------------
PRE_ENCODED = "mm_encoder_outputs"
"""generate()'s keyword for media it encoded ahead of the prefill (the raw pixel inputs are then dropped)."""


def encoded_media(inputs: dict[str, Any], kind: str) -> list[torch.Tensor] | None:
    """Per image or video, its LLM-ready features, when generate() encoded `kind` ahead of the prefill."""
    encoded = (inputs.get(PRE_ENCODED) or {}).get(kind)
    if encoded is None:
        return None
    features = getattr(encoded, "pooler_output", None)
    if features is None:
        raise SeamError("pre encoded media", f"{PRE_ENCODED}[{kind!r}] ({type(encoded).__name__}) has no pooler_output")
    return list(features)


def wrap_media_features(
    outer: nn.Module, kind: str, observe: Callable[[dict[str, Any]], None], needs: tuple[str, ...] | None = None
) -> Callable[[], None]:
    """Call `observe(arguments)` on every `outer.get_<kind>_features(...)` call, whose signature must name one
    of the arguments `needs` (default ``<kind>_grid_thw``); return the undo."""
    name, needs = f"get_{kind}_features", needs or (f"{kind}_grid_thw",)
    stock = getattr(outer, name, None)
    if stock is None:
        raise SeamError("media features", f"{type(outer).__name__} has no {name}")
    signature = inspect.signature(stock)
    if not set(needs) & set(signature.parameters):
        raise SeamError("media features", f"{type(outer).__name__}.{name} takes none of {', '.join(needs)}")

    @functools.wraps(stock)  # generate() reads the signature to pick the arguments it passes
    def observed(*args, **kwargs):
        observe(signature.bind_partial(*args, **kwargs).arguments)
        return stock(*args, **kwargs)

    return _replace_method(outer, name, observed)


def given_media_features(outer: nn.Module, kind: str, features: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """Make `outer.get_<kind>_features(...)` return `features()` (the LLM-ready rows of every image or video of
    the call, in sequence order) without running the vision tower; return the undo. For towers whose features
    are the pooled rows alone (not Qwen3-VL, which also returns deepstack features)."""
    name = f"get_{kind}_features"
    stock = getattr(outer, name, None)
    if stock is None:
        raise SeamError("media features", f"{type(outer).__name__} has no {name}")

    @functools.wraps(stock)
    def given(*args, **kwargs):
        return BaseModelOutputWithPooling(pooler_output=[features()])

    return _replace_method(outer, name, given)


def _replace_method(module: nn.Module, name: str, replacement: Callable) -> Callable[[], None]:
    """Set `replacement` as `module`'s own `name`; the undo puts back what was there (an earlier replacement,
    else the class's method), so replacements nest (a patched model inside the training script's symbols)."""
    missing = object()
    previous = vars(module).get(name, missing)
    setattr(module, name, replacement)
    return lambda: delattr(module, name) if previous is missing else setattr(module, name, previous)


def onevision_image_scores(outer: nn.Module, scores: torch.Tensor, arguments: dict[str, Any]) -> list[torch.Tensor]:
    """Per image of one LLaVA-OneVision ``get_image_features`` call (its `arguments`), the score of each of its
    LLM tokens: `scores` (views, tower tokens), one row per base view and anyres crop in the call's order, split
    and laid out by the model's own ``pack_image_features`` (crops unpadded and, past the ratio, resized; 0 for
    each newline token), so the scores sit where the features do."""
    from transformers.models.llava_onevision import modeling_llava_onevision as onevision

    config = outer.config
    sizes, counts = arguments["image_sizes"], arguments.get("batch_num_images")
    patching = [True] * len(sizes) if counts is None else [n == 1 for n in counts.tolist() for _ in range(n)]
    views = [
        onevision.image_size_to_num_patches(
            image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
        )
        if patch
        else 1
        for size, patch in zip(sizes, patching, strict=True)
    ]
    if sum(views) != len(scores):
        raise SeamError("onevision layout", f"{len(scores)} tower rows for image views {views}")
    ratio = arguments.get("vision_aspect_ratio") or config.vision_aspect_ratio
    newline = torch.zeros(1, device=scores.device)
    packed, _ = outer.pack_image_features(
        list(scores[..., None].split(views)), sizes, image_newline=newline, vision_aspect_ratio=ratio
    )
    return [p[:, 0] for p in packed]


ONEVISION_VIDEO = ("pixel_values_videos", "pixel_values")
"""The clips' argument of LLaVA-OneVision's ``get_video_features``: newest name first (``pixel_values`` to 5.23)."""


def onevision_video_scores(outer: nn.Module, scores: torch.Tensor, arguments: dict[str, Any]) -> list[torch.Tensor]:
    """Per video of one LLaVA-OneVision ``get_video_features`` call (its `arguments`), the score of each of its
    LLM tokens: `scores` (videos * frames, tower tokens) pooled by the model's own ``apply_pooling`` (2x2),
    frames in order, then 0 for the video's closing newline token."""
    videos = onevision_clips(arguments).shape[0]
    pooled = outer.apply_pooling(scores[..., None])[..., 0]
    return [torch.cat([v.reshape(-1), v.new_zeros(1)]) for v in pooled.reshape(videos, -1, pooled.shape[-1])]


def onevision_clips(arguments: dict[str, Any]) -> torch.Tensor:
    """The (videos, frames, channels, height, width) clips of one LLaVA-OneVision ``get_video_features`` call."""
    clips = next((arguments[name] for name in ONEVISION_VIDEO if name in arguments), None)
    if clips is None:
        raise SeamError("onevision layout", f"get_video_features was called without any of {ONEVISION_VIDEO}")
    return clips


def onevision_frame_regions(outer: nn.Module, clips: torch.Tensor, patch: int) -> torch.Tensor:
    """(videos, frames, tokens per frame, d): the pixels each of a clip's LLM tokens stands for, one row per token:
    every frame cut into `patch`-pixel patches as the tower reads them, pooled by the model's own ``apply_pooling``
    (the bilinear 2x2 pooling its features go through), so a token's row mixes its patches as its feature does."""
    videos, frames, channels, height, width = clips.shape
    rows, cols = height // patch, width // patch
    grid = clips.reshape(videos * frames, channels, height, width)[..., : rows * patch, : cols * patch]
    patches = grid.unfold(2, patch, patch).unfold(3, patch, patch)  # (vf, c, rows, cols, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(videos * frames, rows * cols, -1)
    pooled = outer.apply_pooling(patches.float())
    return pooled.reshape(videos, frames, pooled.shape[1], -1)


def window_order(tower: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """(merged tokens,) the order a windowed Qwen tower holds its merged-token groups in (``window_index``)."""
    from transformers import vision_utils

    if not hasattr(vision_utils, "get_vision_window_index"):
        raise SeamError("vision window index", "transformers.vision_utils has no get_vision_window_index")
    index, _ = vision_utils.get_vision_window_index(
        grid_thw,
        spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    return index


VISION_BLOCK_KWARGS = ("cu_seqlens", "position_embeddings")
"""What a Qwen vision tower passes each block besides the hidden states (and ``max_seqlen``, recomputed)."""


def ragged_block_call(
    args: tuple, kwargs: dict[str, Any], keep: torch.Tensor, before: torch.Tensor, memo: dict[int, Any]
) -> tuple[tuple, dict[str, Any]]:
    """A Qwen vision block's call arguments cut to the patches `keep` ((N,) bool, in the tower's order): the
    hidden states where they are still N long, the rotary (cos, sin) rows, and the packed-sequence ends
    ``cu_seqlens`` mapped through `before` ((N + 1,) kept patches before each position) with the segments that
    lost every patch removed; ``max_seqlen`` is left for the block to recompute. `memo` keeps what the blocks
    share (the tower hands every block the same tensors)."""
    missing = [k for k in VISION_BLOCK_KWARGS if k not in kwargs]
    if missing:
        raise SeamError("vision block call", f"a Qwen vision block was called without {', '.join(missing)}")
    hidden = args[0] if args else kwargs["hidden_states"]
    if hidden.shape[0] == keep.shape[0]:
        hidden = hidden[keep]
    ends, rotary = kwargs["cu_seqlens"], kwargs["position_embeddings"]
    if id(ends) not in memo:
        memo[id(ends)] = before.to(ends.device, ends.dtype)[ends.long()].unique_consecutive()
    if id(rotary) not in memo:
        memo[id(rotary)] = tuple(part[keep] for part in rotary)
    kwargs = {**kwargs, "cu_seqlens": memo[id(ends)], "position_embeddings": memo[id(rotary)]}
    if "max_seqlen" in kwargs:
        kwargs["max_seqlen"] = None
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


DEEPSTACK_PARAMETERS = ("hidden_states", "visual_pos_masks", "visual_embeds")


def wrap_deepstack(language_model: nn.Module, wrapper: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """Route Qwen3-VL's `_deepstack_process(hidden_states, visual_pos_masks, visual_embeds)` through
    `wrapper(stock, hidden_states, visual_pos_masks, visual_embeds)`; return the undo."""
    stock = getattr(language_model, "_deepstack_process", None)
    if stock is None or tuple(inspect.signature(stock).parameters) != DEEPSTACK_PARAMETERS:
        raise SeamError("deepstack", f"{type(language_model).__name__} has no _deepstack_process{DEEPSTACK_PARAMETERS}")
    signature = inspect.signature(stock)

    def deepstack(*args, **kwargs):
        return wrapper(stock, *signature.bind(*args, **kwargs).arguments.values())

    language_model._deepstack_process = deepstack
    return lambda: delattr(language_model, "_deepstack_process")


# -- loss -----------------------------------------------------------------------------------------------
def wrap_loss(model: nn.Module, wrapper: Callable[..., torch.Tensor]) -> Callable[[], None]:
    """Route the model's `loss_function(logits=, labels=, vocab_size=, ...)` through `wrapper(stock, **kwargs)`."""
    if not isinstance(getattr(type(model), "loss_function", None), property):
        raise SeamError("loss function", f"{type(model).__name__}.loss_function is not the settable property")
    own = model.__dict__.get("_loss_function")
    stock = model.loss_function
    model.loss_function = lambda **kwargs: wrapper(stock, **kwargs)

    def undo() -> None:
        if own is None:
            del model._loss_function
        else:
            model._loss_function = own

    return undo
