"""The lmms-eval model ``tokred``: lmms-eval's own class for a family, loaded as usual, then `tokred.patch`-ed.

    python -m lmms_eval --model tokred \\
        --model_args base=qwen2_5_vl,pretrained=PATH,recipe=fastv-25 --tasks ... --device cpu

Registered through the ``lmms_eval.models`` entry point (pyproject.toml -> `lmms_manifest.MANIFEST`), which
lmms-eval >= 0.7 reads when it starts. Prompts, media loading and decoding stay lmms-eval's; tokred only adds
its hooks to the loaded model.
Model args besides the base class's own: ``base`` (lmms-eval model name), ``recipe`` (preset or method name,
default the family's recommended one), ``keep`` (with a method name), ``kv`` and ``weights`` (a scheme in
``tokred.KV_SCHEMES`` / ``tokred.WEIGHT_BITS``, added to the recipe), and ``dtype`` (reload the weights at this
dtype; lmms-eval's Qwen classes load bfloat16). ``pretrained`` may be a shipped tokred checkpoint name.
``device=cpu`` also sets ``device_map=cpu`` (the classes' default "auto" would place the model on a GPU) and a
default ``dtype=float32``, what `tokred eval` runs on the CPU; otherwise the class places the model (one GPU per
process under ``accelerate launch``) at its own dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from lmms_eval.api.model import lmms

import tokred
from tokred.adapters import adapter_class
from tokred.eval.lmms_run import BASE, base_for
from tokred.zoo.checkpoints import model_type, resolve

BASES = tuple(dict.fromkeys(BASE.values()))
"""lmms-eval model names that ``base`` may take (llava_hf covers LLaVA and LLaVA-OneVision on transformers)."""

NOT_TRANSFORMERS = {
    "llava_onevision": "the original LLaVA-NeXT code (the `llava` package)",
    "llava": "the original LLaVA code (the `llava` package)",
}
"""lmms-eval classes for our families that load their models without transformers."""


class Tokred(lmms):
    """``--model tokred``: builds lmms-eval's class for ``base`` with tokred applied (see the module docstring)."""

    is_simple = False

    def __new__(cls, base: str = "", **kwargs: Any):  # returns an instance of the patched base class
        if base in NOT_TRANSFORMERS:
            raise ValueError(
                f"lmms-eval's {base!r} class runs {NOT_TRANSFORMERS[base]}, not transformers, so tokred cannot patch "
                "it; for the same model on transformers use base=llava_hf"
            )
        if base not in BASES:
            raise ValueError(f"tokred needs base=<lmms-eval model>, one of: {', '.join(BASES)}; got {base!r}")
        return _patched_class(base)(**kwargs)


@functools.cache
def _patched_class(base: str) -> type:
    """A subclass of lmms-eval's class for ``base`` (chat when it has one) that patches the model it loads."""
    from lmms_eval.models import get_model  # not at import: lmms-eval imports this module while building its registry

    parent = get_model(base)

    class Patched(parent):
        def __init__(
            self,
            pretrained: str,
            recipe: str | None = None,
            keep: float | None = None,
            kv: str = "none",
            weights: str = "none",
            dtype: str | None = None,
            **kwargs: Any,
        ) -> None:
            config = recipe_config(recipe, keep)
            if str(kwargs.get("device", "")).startswith("cpu"):
                kwargs.setdefault("device_map", "cpu")
                dtype = dtype or "float32"  # bfloat16 would change a few answers from tokred eval's
            path = str(resolve(pretrained))
            family = model_type(path)
            config = (config or tokred.Config.parse(adapter_class(family).recommended)).with_schemes(kv, weights)
            if base_for(family, path) != base:
                raise ValueError(f"{pretrained} is a {family!r} checkpoint: use base={BASE[family]}, not base={base}")
            super().__init__(pretrained=path, **kwargs)
            if dtype is not None and self._model.dtype != getattr(torch, dtype):
                attn = self._model.config._attn_implementation
                self._model = (
                    type(self._model)
                    .from_pretrained(
                        path, dtype=getattr(torch, dtype), device_map=self._model.device, attn_implementation=attn
                    )
                    .eval()
                )
            tokred.patch(self._model, config)

    Patched.__name__ = Patched.__qualname__ = f"Tokred_{parent.__name__}"
    return Patched


def recipe_config(recipe: str | None, keep: float | None) -> tokred.Config | None:
    """``recipe`` (a preset or recipe text, see `tokred.Config`) and an optional ``keep`` for a bare method name."""
    if keep is None:
        return None if recipe is None else tokred.Config.parse(recipe)
    if recipe not in tokred.METHODS:
        raise ValueError(f"keep= goes with a method name ({', '.join(sorted(tokred.METHODS))}), got recipe={recipe!r}")
    return tokred.Config.parse(f"{recipe}:keep={keep}")
