"""The chat prompt of a benchmark question and the greedy answers to a batch of them, shared by training,
`tokred eval` and the lmms-eval plugin's local tasks."""

from __future__ import annotations

import torch

MEDIA = {"shapes": "image", "motion": "video"}
"""The medium of each synthetic task: ShapesVQA asks about images, MotionVQA about clips."""


def chat(processor, kind: str, question: str, first: bool = True) -> str:
    """The family's prompt for one user turn, ending with the assistant's prefix; the first turn holds the media."""
    content = [{"type": MEDIA[kind]}] if first else []
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def media_inputs(processor, kind: str, texts: list[str], media: list) -> dict:
    """Processor inputs (left-padded batch) for texts that each hold one image or clip of the task's medium."""
    key = "images" if MEDIA[kind] == "image" else "videos"
    return processor(text=texts, **{key: media}, return_tensors="pt", padding=True)


def generate_answers(
    model, processor, kind: str, questions: list[str], media: list, max_new_tokens: int, **generate_kwargs
) -> tuple[list[str], object]:
    """Greedy continuations of the questions' first-turn prompts (special tokens dropped) and generate()'s output."""
    texts = [chat(processor, kind, question) for question in questions]
    inputs = media_inputs(processor, kind, texts, media).to(model.device)
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True, **generate_kwargs
        )
    prompt = inputs["input_ids"].shape[1]
    return processor.batch_decode(out.sequences[:, prompt:], skip_special_tokens=True), out
