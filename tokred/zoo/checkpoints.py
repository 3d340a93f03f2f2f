"""Trained tiny checkpoints shipped inside the package, loadable by name or by path."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

SHIPPED = Path(__file__).parent / "checkpoints"


def available() -> list[str]:
    """Names of the trained checkpoints in this installation."""
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "card.json").is_file()) if SHIPPED.is_dir() else []


def card(name_or_path: str | os.PathLike) -> dict:
    """The model card (sizes, data, seed, accuracy, training time and machine) of a trained checkpoint."""
    return json.loads((resolve(name_or_path) / "card.json").read_text())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A shipped name or a directory -> the checkpoint directory, with an error listing the names."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if (SHIPPED / str(name_or_path)).is_dir():
        return SHIPPED / str(name_or_path)
    names = ", ".join(available()) or "none in this installation"
    raise ValueError(f"no checkpoint named or at {str(name_or_path)!r}; shipped checkpoints: {names}")


def model_type(name_or_path: str | os.PathLike) -> str:
    """A checkpoint's config.model_type (its family), read without loading the weights."""
    path = resolve(name_or_path)
    try:
        return AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a loadable checkpoint ({type(error).__name__}: {error})") from error


def load(name_or_path: str | os.PathLike, **kwargs) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Model (eval mode) and processor of a shipped name or a checkpoint directory."""
    path = resolve(name_or_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs).eval()
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise ValueError(f"{path} is not a loadable checkpoint ({type(error).__name__}: {error})") from error
    return model, processor
