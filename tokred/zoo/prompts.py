"""The chat prompt of a benchmark question and the greedy answers to a batch of them, shared by training,
`tokred eval` and the lmms-eval plugin's local tasks."""

from __future__ import annotations

import torch

from tokred.zoo.datasets import ANSWERS

MEDIA = {"shapes": "image", "motion": "video"}
"""The medium of each synthetic task: ShapesVQA asks about images, MotionVQA about clips."""
FPS = 2.0
"""The frame rate clips are given to processors at (without one, transformers assumes 24 fps, so Qwen's M-RoPE
time steps between two-frame patches round to 0); 2 fps is also what qwen_vl_utils, and with it lmms-eval's Qwen
classes, gives frame lists."""


def chat(processor, kind: str, question: str, first: bool = True) -> str:
    """The family's prompt for one user turn, ending with the assistant's prefix; the first turn holds the media."""
    content = [{"type": MEDIA[kind]}] if first else []
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def media_inputs(processor, kind: str, texts: list[str], media: list) -> dict:
    """Processor inputs (left-padded batch) for texts that each hold one image or clip of the task's medium."""
    if MEDIA[kind] == "image":
        return processor(text=texts, images=media, return_tensors="pt", padding=True)
    metadata = [{"fps": FPS, "frames_indices": list(range(len(clip))), "total_num_frames": len(clip)} for clip in media]
    return processor(text=texts, videos=media, video_metadata=metadata, return_tensors="pt", padding=True)


def generate_answers(
    model, processor, kind: str, questions: list[str], media: list, max_new_tokens: int, **generate_kwargs
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


def leading_answer(text: str, kind: str) -> str:
    """The answer a model's output gives: the longest of the task's answers (`datasets.ANSWERS`) the output
    starts with, else its first line, stripped. What follows an answer (the end of the turn, or junk where a
    cut left the model unsure when to stop) is not part of it."""
    text = text.strip()
    found = [a for a in ANSWERS[kind] if text.startswith(a)]
    return max(found, key=len) if found else text.split("\n")[0].strip()
