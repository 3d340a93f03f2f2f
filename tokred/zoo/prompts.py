"""The chat prompt of a benchmark question, shared by training, `tokred eval` and the lmms-eval plugin."""

from __future__ import annotations

MEDIA = {"shapes": "image", "motion": "video"}
"""The medium of each synthetic task: ShapesVQA asks about images, MotionVQA about clips."""


def chat(processor, kind: str, question: str, first: bool = True) -> str:
    """The family's prompt for one user turn, ending with the assistant's prefix; the first turn holds the media."""
    content = [{"type": MEDIA[kind]}] if first else []
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
