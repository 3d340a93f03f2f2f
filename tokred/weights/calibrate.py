"""LUQ calibration: per linear layer of the LLM, the entropy of its outputs on the vision tokens and its output error
at each candidate width, measured in one pass of a mixed image+text calibration set; saved and read back as JSON.

LUQ (Bhatnagar et al., 2025) found that layers whose outputs on multimodal tokens have low entropy tolerate
ultra-low bits; `tokred.weights.allocate` spends a bit budget by these numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoProcessor

from tokred.adapters import adapter_for
from tokred.weights.quant import WEIGHT_WIDTHS, check_width, dequantize_weight, quantize_weight
from tokred.zoo import datasets
from tokred.zoo.builders import cache_root
from tokred.zoo.prompts import chat, media_inputs

BINS = 256
BINS_PER_STD = 16
"""The entropy histogram: 256 bins of a sixteenth of a standard deviation, ±8 deviations around the mean."""
TASK = "shapes"
"""The default calibration set: ShapesVQA train records (images and their questions)."""


@dataclass(frozen=True)
class LayerStats:
    """What calibration measured of one linear layer."""

    shape: tuple[int, int]  # (out_features, in_features)
    entropy: float  # bits: `histogram_entropy` of its outputs on the vision tokens, the mean over samples
    errors: dict[int, float]  # width -> ||X W^T - X Ŵ^T||_F / ||X W^T||_F over every calibration token
    nbytes: dict[int, int]  # width -> bytes its QuantizedWeight holds (codes, scales and zeros)

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class Calibration:
    """A model's calibration: `layers` maps each measured linear layer's qualified name to its `LayerStats`."""

    model: str  # the model's name or path (config._name_or_path)
    group: int  # the quantization group the errors were measured at
    candidates: tuple[int, ...]  # the widths measured
    samples: int  # calibration samples (processor outputs) run
    layers: dict[str, LayerStats]

    def to_json(self, path: str | os.PathLike) -> None:
        """Write it as JSON; `from_json` reads back an equal Calibration."""
        layers = {
            name: {
                "shape": list(s.shape),
                "entropy": s.entropy,
                "errors": {str(b): e for b, e in s.errors.items()},
                "nbytes": {str(b): n for b, n in s.nbytes.items()},
            }
            for name, s in self.layers.items()
        }
        fields = {"model": self.model, "group": self.group, "candidates": list(self.candidates)}
        with open(path, "w") as f:
            json.dump({**fields, "samples": self.samples, "layers": layers}, f, indent=1)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Calibration:
        """The Calibration `to_json` wrote at `path`."""
        with open(path) as f:
            data = json.load(f)
        try:
            layers = {
                name: LayerStats(
                    tuple(s["shape"]),
                    s["entropy"],
                    {int(b): e for b, e in s["errors"].items()},
                    {int(b): n for b, n in s["nbytes"].items()},
                )
                for name, s in data["layers"].items()
            }
            return cls(data["model"], data["group"], tuple(data["candidates"]), data["samples"], layers)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path} is not a tokred calibration ({type(error).__name__}: {error})") from None


def calibrate(
    model: nn.Module,
    processor,
    samples: Sequence[Mapping] | None = None,
    *,
    n: int = 32,
    candidates: tuple[int, ...] = (2, 3, 4, 8),
    group: int = 64,
    lm_head: bool = False,
    progress: bool = True,
) -> Calibration:
    """Run the calibration set through `model` once, measuring every linear layer of its LLM (and `lm_head` when
    asked; never the vision tower).

    `samples` are processor outputs (dicts with `input_ids`, the pixel inputs and optionally `attention_mask`; a
    batch may be padded); by default `n` ShapesVQA train records, each image and question given through the chat
    template and the processor as `tokred eval` gives them. Per layer it records the mean `histogram_entropy` of
    its outputs at the image and video token positions, and at each candidate width b the relative output error
    ||X W^T - X Ŵ_b^T||_F / ||X W^T||_F over all captured inputs X (padding left out), Ŵ_b being
    `dequantize_weight(quantize_weight(W, b, group))`. A set without image or video tokens is refused: the
    entropy criterion reads the multimodal tokens.
    """
    _check_candidates(candidates)
    layers = llm_linears(model, lm_head)
    check_group(layers, group)
    if samples is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1 (calibration samples), got {n!r}")
        samples = shapes_samples(processor, n)
    vision_ids = torch.tensor(list(adapter_for(model).token_ids().values()))
    rows = [_rows(sample, vision_ids) for sample in samples]
    seen = sum(bool(vision.any()) for _, vision in rows)
    if not seen:
        raise ValueError(
            "the calibration set has no image or video tokens; LUQ's criterion is the entropy of each layer's "
            "outputs on multimodal tokens, so give samples that each hold an image or video"
        )
    meters = {name: _Meter(layer, candidates, group) for name, layer in layers.items()}
    handles = [layer.register_forward_hook(meters[name]) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.inference_mode():
            for sample, (valid, vision) in tqdm(
                list(zip(samples, rows, strict=True)), desc="calibrating", unit="sample", disable=not progress
            ):
                for meter in meters.values():
                    meter.rows = (valid.to(device), vision.to(device))
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
                model(**inputs, use_cache=False, logits_to_keep=0 if lm_head else 1)
    finally:
        for handle in handles:
            handle.remove()
    name_or_path = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    stats = {name: meter.stats(seen) for name, meter in meters.items()}
    return Calibration(name_or_path, group, tuple(candidates), len(samples), stats)


def calibration_for(
    model: nn.Module, path: str | os.PathLike | None, *, group: int, candidates: tuple[int, ...]
) -> Calibration:
    """The calibration a weight scheme allocates `model`'s widths by: read from `path` and checked against the
    model, the group and the widths; without a path, measured with the processor saved beside the model, once:
    the result is kept under ``$TOKRED_CACHE/calibrations/``, keyed by the checkpoint's files, group and widths."""
    if path is not None:
        calibration = Calibration.from_json(path)
        _check_fits(calibration, model, path, group, candidates)
        return calibration
    source = str(getattr(model.config, "_name_or_path", ""))
    if not source or not os.path.isdir(source):
        raise ValueError(
            f"LayerBits needs a calibration, and this model's config._name_or_path ({source!r}) is not a local "
            "directory to load its processor from; run `from tokred.weights.calibrate import calibrate; "
            "calibrate(model, processor).to_json(path)` once and pass LayerBits(calibration=path)"
        )
    saved = cached_path(source, group, candidates)
    if saved.is_file():
        calibration = Calibration.from_json(saved)
        _check_fits(calibration, model, saved, group, candidates)
        return calibration
    processor = AutoProcessor.from_pretrained(source, local_files_only=True)
    calibration = calibrate(model, processor, group=group, candidates=candidates)
    saved.parent.mkdir(parents=True, exist_ok=True)
    partial = saved.with_suffix(f".{os.getpid()}.tmp")
    calibration.to_json(partial)
    partial.replace(saved)  # whole or absent, also beside a concurrent writer
    return calibration


def cached_path(source: str | os.PathLike, group: int, candidates: tuple[int, ...]) -> Path:
    """Where `calibration_for` keeps the calibration of the checkpoint directory `source`: named by a hash of its
    weight files (path, size, modification time), the group and the widths, so a retrained checkpoint is
    calibrated again."""
    root = Path(source).resolve()
    files = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
    identity = [str(root), group, list(candidates), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    return cache_root() / "calibrations" / f"{root.name}-{digest}.json"


def llm_linears(model: nn.Module, lm_head: bool = False) -> dict[str, nn.Linear]:
    """Qualified name -> module of every nn.Linear in the model's LLM (the decoder; `lm_head` too when asked)."""
    inside = {id(m) for m in adapter_for(model).language_model.modules()}
    if lm_head:
        inside.add(id(model.get_output_embeddings()))
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}


def check_group(layers: Mapping[str, nn.Linear], group: int) -> None:
    """A ValueError naming the first layer whose input width `group` does not divide."""
    for name, layer in layers.items():
        try:
            check_width(WEIGHT_WIDTHS[0], group, layer.in_features)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


def shapes_samples(processor, n: int, seed: int = 0) -> list[dict]:
    """Processor outputs of the first `n` ShapesVQA train records, one a sample, prompted as `tokred eval` does."""
    samples = []
    for i in range(n):
        record, image = datasets.sample(TASK, "train", i, seed)
        samples.append(media_inputs(processor, TASK, [chat(processor, TASK, record["question"])], [image]))
    return samples


def histogram_entropy(values: torch.Tensor) -> torch.Tensor:
    """Shannon entropy, in bits, of the values' histogram in bins of 1/16 of their standard deviation, over ±8
    deviations around their mean (outer values fall in the end bins). Standardising makes it a measure of shape,
    not scale: a Gaussian gives about log2(16 sqrt(2 pi e)) = 6.05 bits, two equally likely values 1 bit, a
    constant 0, and peaked or sparse outputs less than a Gaussian of the same spread."""
    x = values.detach().flatten().double()
    z = (x - x.mean()) / x.std(correction=0).clamp_min(torch.finfo(torch.float64).tiny)
    bins = (z * BINS_PER_STD + BINS // 2).floor().clamp(0, BINS - 1).long()
    p = torch.bincount(bins, minlength=BINS).double() / x.numel()
    p = p[p > 0]
    return -(p * p.log2()).sum()


class _Meter:
    """A forward hook that sums one layer's squared output errors, squared outputs and entropies over the calls."""

    def __init__(self, layer: nn.Linear, candidates: tuple[int, ...], group: int) -> None:
        self.layer, self.candidates, self.group = layer, candidates, group
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (valid, vision) of the call in flight
        self.sums = torch.zeros(len(candidates) + 2, dtype=torch.float64, device=layer.weight.device)

    def __call__(self, module: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        valid, vision = self.rows
        x = args[0]
        if x.shape[:-1] != valid.shape:
            raise ValueError(
                f"a linear layer of the LLM saw {tuple(x.shape[:-1])} tokens where input_ids has {tuple(valid.shape)}; "
                "calibrate the stock model (tokred.unpatch it first)"
            )
        x = x[valid].float()
        w = module.weight.float()
        errors = [
            (x @ (w - dequantize_weight(quantize_weight(w, b, self.group))).T).double().square().sum()
            for b in self.candidates
        ]
        reference = (x @ w.T).double().square().sum()
        entropy = histogram_entropy(output[vision]) if vision.any() else torch.zeros((), dtype=torch.float64)
        self.sums += torch.stack([*errors, reference, entropy.to(self.sums.device)])

    def stats(self, seen: int) -> LayerStats:
        """The layer's LayerStats, `seen` calls having held vision tokens."""
        *errors, reference, entropy = self.sums.tolist()
        w = self.layer.weight
        relative = {
            b: (e / max(reference, torch.finfo(torch.float64).tiny)) ** 0.5
            for b, e in zip(self.candidates, errors, strict=True)
        }
        nbytes = {b: quantize_weight(w, b, self.group).nbytes for b in self.candidates}
        return LayerStats((w.shape[0], w.shape[1]), entropy / seen, relative, nbytes)


def _rows(sample: Mapping, vision_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(valid, vision): bool masks over a sample's tokens of those not padding and of the image and video tokens."""
    ids = sample.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise ValueError("each calibration sample must be a processor output holding input_ids (a tensor)")
    mask = sample.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    return valid, torch.isin(ids, vision_ids.to(ids.device)) & valid


def _check_fits(
    calibration: Calibration, model: nn.Module, path: str | os.PathLike, group: int, candidates: tuple[int, ...]
) -> None:
    """A ValueError unless `calibration` measured `model`'s LLM linear layers at `group` and at every candidate."""
    if calibration.group != group:
        raise ValueError(f"{path} was measured at group={calibration.group}; the scheme asks for group={group}")
    missing = sorted(set(candidates) - set(calibration.candidates))
    if missing:
        measured = ", ".join(map(str, calibration.candidates))
        raise ValueError(f"{path} measured widths {measured}, not {', '.join(map(str, missing))}")
    modules = dict(model.named_modules())
    wrong = [
        name
        for name, s in calibration.layers.items()
        if not isinstance(modules.get(name), nn.Linear) or tuple(modules[name].weight.shape) != s.shape
    ]
    wrong += sorted(set(llm_linears(model)) - set(calibration.layers))
    if wrong:
        raise ValueError(
            f"{path} does not fit this model (it calibrated {calibration.model!r}): {len(wrong)} layers are missing "
            f"from one of them or shaped otherwise, first {wrong[0]!r}; calibrate this model and save that"
        )


def _check_candidates(candidates: tuple[int, ...]) -> None:
    widths = ", ".join(map(str, WEIGHT_WIDTHS))
    if (
        not isinstance(candidates, tuple)
        or not candidates
        or len(set(candidates)) != len(candidates)
        or any(isinstance(b, bool) or b not in WEIGHT_WIDTHS for b in candidates)
    ):
        raise ValueError(f"candidates must be a tuple of distinct widths from {widths}, got {candidates!r}")
