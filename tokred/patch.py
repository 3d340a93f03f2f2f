"""The public verbs: patch, unpatch, patched, stats."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from tokred.adapters import adapter_for
from tokred.config import Config, resolve
from tokred.methods.base import Method
from tokred.stages.session import Session
from tokred.stats import Stats

ATTRIBUTE = "_tokred_session"


def patch(model: nn.Module, config: Config | Method | str | None = None) -> nn.Module:
    """Install `config` on `model` in place and return it; a model already patched is unpatched first.

    `config`: None for the family's recommended recipe, a preset name ("fastv-25", "random-50", ...),
    a method name ("fastv": its defaults), one method config, or a `tokred.Config`.
    """
    adapter = adapter_for(model)
    session = Session(adapter, resolve(config, adapter.recommended))
    unpatch(model)
    session.install()
    setattr(model, ATTRIBUTE, session)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every tokred hook and wrapper; the model computes exactly what it did before `patch`."""
    session = getattr(model, ATTRIBUTE, None)
    if session is not None:
        session.uninstall()
        delattr(model, ATTRIBUTE)
    return model


@contextmanager
def patched(model: nn.Module, config: Config | Method | str | None = None) -> Iterator[nn.Module]:
    """`with tokred.patched(model, "fastv-25"): ...` — patched inside the block, stock after it."""
    patch(model, config)
    try:
        yield model
    finally:
        unpatch(model)


def stats(model: nn.Module) -> Stats:
    """What the last forward or generate call of a patched model kept."""
    session = getattr(model, ATTRIBUTE, None)
    if session is None:
        raise ValueError("stats() needs a model patched with tokred.patch()")
    return session.stats
