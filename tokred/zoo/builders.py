"""Offline builder of tiny random-weight VLM checkpoints.

Tests and examples need real ``transformers`` checkpoints (model, tokenizer, processor, chat
template) for each supported VLM family, but no model hub is reachable. :func:`build` makes one
locally in a few seconds: a byte-level BPE tokenizer trained on a tiny corpus, the family's
special tokens, a chat template that mirrors the real family's prompt format, small image/video
resolutions, and a randomly initialised float32 model. Everything is written with
``save_pretrained`` so that ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it like a
hub checkpoint.

This module builds and caches; what goes into each family's checkpoint lives in its own file
under ``tokred/zoo/families/`` (shared parts in ``families/base.py``).

Sizes (defaults): text model hidden 64, 4 layers, 4 heads, 2 KV heads (GQA), MLP 128; vision
towers hidden 32 with 2-3 layers. Image/video token counts for the test inputs are listed in
each family's file.

Written against transformers 5.23 and checked with 5.17; version-dependent spots are commented.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import torch
import transformers
from transformers import AutoModelForImageTextToText, GenerationConfig

from tokred.zoo.families import BUILDERS
from tokred.zoo.families.base import make_tokenizer, text_kwargs

__all__ = ["FAMILIES", "MARKER", "build", "default_cache_dir"]

MARKER = ".tokred-build.json"
"""File written last into a finished build; its content decides whether a cached build is reused."""

_FORMAT = 2  # bump when the builders change in a way that invalidates cached checkpoints

FAMILIES: tuple[str, ...] = tuple(BUILDERS)
"""Supported families: ``("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")``."""


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
    spec = BUILDERS[family]
    tok = make_tokenizer(spec.tokens)
    image_size = overrides.get("image_size")
    config = spec.config(tok, text_kwargs(tok, overrides.get("text", {})), overrides.get("vision", {}), image_size)
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
    if family not in BUILDERS:
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
