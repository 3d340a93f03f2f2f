"""Shared fixtures: a tiny checkpoint per family (built offline by tokred.zoo) and inputs for it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in triton's CPU interpreter. triton reads the variable when it is first
# imported (transformers imports it), so it is set here, before anything below imports transformers.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

import tokred  # noqa: E402
from tokred.methods import METHODS, TokenMerger, TokenReducer  # noqa: E402
from tokred.zoo import FAMILIES, build  # noqa: E402

EXAMPLES = {name: method.example() for name, method in METHODS.items()}
EXAMPLES |= {
    f"{name}+merge": replace(method, merge=True)
    for name, method in EXAMPLES.items()
    if isinstance(method, TokenReducer) and not isinstance(method, TokenMerger)
}
"""Every registered method at its example setting, and every selecting one also with ``merge=True``: the
conformance tests run each of them."""
REDUCERS = {name: method for name, method in EXAMPLES.items() if isinstance(method, TokenReducer)}
"""The examples that keep a budget of tokens (`keep`): the tests of budget counts run these."""

VIDEO_FAMILIES = ("llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def compile_for_hopper(script: str) -> str:
    """Run `script` (which compiles Triton kernels for sm_90 and prints a line per kernel) in a subprocess
    without triton's CPU interpreter; its stdout, once it succeeded."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def noise_image(seed: int, size: tuple[int, int] = (112, 112)) -> Image.Image:
    """A deterministic noise picture, so vision tokens differ and attention has something to rank."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@dataclass
class Tiny:
    family: str
    path: str
    model: PreTrainedModel
    processor: ProcessorMixin

    def load(self, **kwargs) -> PreTrainedModel:
        """A fresh copy of the same checkpoint (e.g. with another attn_implementation)."""
        return AutoModelForImageTextToText.from_pretrained(self.path, **kwargs).eval()

    def prompt(self, *items: str, text: str = "what colour is the small circle?") -> str:
        content = [{"type": item} for item in items] + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def image(self, seed: int = 0) -> dict:
        return self.processor(images=[noise_image(seed)], text=[self.prompt("image")], return_tensors="pt")

    def video(self, frames: int = 8) -> dict:
        video = [noise_image(100 + i) for i in range(frames)]
        return self.processor(videos=[video], text=[self.prompt("video")], return_tensors="pt")

    def samples(self) -> list[tuple[str, Image.Image]]:
        """Two prompts of different lengths, each with its own image."""
        return [
            (self.prompt("image"), noise_image(1)),
            (self.prompt("image", text="is there a red star in the upper left quadrant?"), noise_image(2, (84, 140))),
        ]

    def batch(self) -> dict:
        """The two samples as one batch (left padding)."""
        texts, images = zip(*self.samples(), strict=True)
        return self.processor(images=list(images), text=list(texts), return_tensors="pt", padding=True)

    def inputs(self, kind: str) -> dict:
        return getattr(self, kind)()


@pytest.fixture(scope="session")
def zoo_root(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("zoo")


def _tiny(family: str, root) -> Tiny:
    path = build(family, root / family)
    model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="sdpa").eval()
    return Tiny(family, str(path), model, AutoProcessor.from_pretrained(path))


def serve(tiny: Tiny, method) -> None:
    """Skip the test where tokred does not serve `method` on this family, after checking that patching says so."""
    from tokred.adapters import adapter_for

    adapter = adapter_for(tiny.model)
    if getattr(method, "needs_encoder_attention", False) and adapter.encoder_attention_block() is None:
        refusal = "needs the vision tower's attention, which tokred reads for the families"
    elif method.stage == "frames" and not (adapter.patch_groups or adapter.whole_frames):
        refusal = "runs the vision tower on a video's changed patches only; tokred does that for towers that take"
    else:
        return
    with pytest.raises(ValueError, match=refusal):
        tokred.patch(tiny.model, method)
    pytest.skip(f"{method.name} is not served on {tiny.family} (refused with a clear error)")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, zoo_root) -> Tiny:
    return _tiny(request.param, zoo_root)


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def tiny_video(request: pytest.FixtureRequest, zoo_root) -> Tiny:
    return _tiny(request.param, zoo_root)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
