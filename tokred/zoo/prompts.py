"""The chat prompt of a benchmark question and the greedy answers to a batch of them, shared by training,
`tokred eval` and the lmms-eval plugin's local tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokred.video import Video
from tokred.zoo.datasets import ANSWERS

MEDIA = {"shapes": "image", "motion": "video"}
"""The medium of each synthetic task: ShapesVQA asks about images, MotionVQA about clips."""


@dataclass(frozen=True)
class Kind:
    """What prompts and scoring need of a task: its medium ("image" or "video") and its answer vocabulary. The
    synthetic tasks are named by a string; a local dataset (`tokred.eval.local`) brings its own Kind."""

    name: str
    medium: str
    answers: tuple[str, ...]


def kind_of(kind: str | Kind) -> Kind:
    """`kind` as a Kind: a synthetic task's name gives its medium and `datasets.ANSWERS`."""
    return kind if isinstance(kind, Kind) else Kind(kind, MEDIA[kind], tuple(ANSWERS[kind]))


FPS = 2.0
"""The frame rate clips are given to processors at (without one, transformers assumes 24 fps, so Qwen's M-RoPE
time steps between two-frame patches round to 0); 2 fps is also what qwen_vl_utils, and with it lmms-eval's Qwen
classes, gives frame lists."""


def chat(processor, kind: str | Kind, question: str, first: bool = True) -> str:
    """The family's prompt for one user turn, ending with the assistant's prefix; the first turn holds the media."""
    content = [{"type": kind_of(kind).medium}] if first else []
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def media_inputs(processor, kind: str | Kind, texts: list[str], media: list) -> dict:
    """Processor inputs (left-padded batch) for texts that each hold one image or clip of the task's medium. A
    clip is a list of frames (given at `FPS`) or a `tokred.video.Video` (its frames at their own times)."""
    if kind_of(kind).medium == "image":
        return processor(text=texts, images=media, return_tensors="pt", padding=True)
    clips = [clip.frames if isinstance(clip, Video) else clip for clip in media]
    metadata = [
        clip.metadata
        if isinstance(clip, Video)
        else {"fps": FPS, "frames_indices": list(range(len(clip))), "total_num_frames": len(clip)}
        for clip in media
    ]
    return processor(
        text=texts, videos=clips, video_metadata=metadata, do_sample_frames=False, return_tensors="pt", padding=True
    )


def generate_answers(
    model, processor, kind: str | Kind, questions: list[str], media: list, max_new_tokens: int, **generate_kwargs
) -> tuple[list[str], object]:
    """Greedy answers to the questions' first-turn prompts (each `leading_answer` of its continuation) and
    generate()'s output."""
    texts = [chat(processor, kind, question) for question in questions]
    inputs = media_inputs(processor, kind, texts, media).to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **generate_kwargs
        )
    prompt = inputs["input_ids"].shape[1]
    texts = processor.batch_decode(out.sequences[:, prompt:], skip_special_tokens=True)
    return [leading_answer(text, kind) for text in texts], out


def leading_answer(text: str, kind: str | Kind) -> str:
    """The answer a model's output gives: the longest of the task's answers (`Kind.answers`) the output
    starts with, else its first line, stripped. What follows an answer (the end of the turn, or junk where a
    cut left the model unsure when to stop) is not part of it."""
    text = text.strip()
    found = [a for a in kind_of(kind).answers if text.startswith(a)]
    return max(found, key=len) if found else text.split("\n")[0].strip()
