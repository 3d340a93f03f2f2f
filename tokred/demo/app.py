"""The Gradio page: one image or video and a question, answered by the stock and the patched model side by side."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

import tokred
from tokred.demo.compare import PRUNERS, STOCK, Run, kept_cells, merged_cells, recipe, stream
from tokred.demo.media import EXAMPLES, example, medium, read
from tokred.demo.overlay import overlay, strip
from tokred.zoo.datasets import Media
from tokred.zoo.prompts import MEDIA

UPLOAD = "upload"
"""The example choice that means: answer about the uploaded file."""
FIRST = next(iter(EXAMPLES))
IMAGE = {"format": "png", "buttons": ["download", "fullscreen"]}
"""Pictures go out lossless (tests read their pixels) and without a share button."""


def pick(choice: str, upload: str | None) -> Media:
    """The chosen example's media, or the uploaded file's when the choice is UPLOAD; ValueError when there is none."""
    if choice != UPLOAD:
        return example(choice)[0]
    if not upload:
        raise ValueError("upload an image or a video, or pick one of the examples")
    return read(upload)


def preview(media: Media) -> Image.Image:
    """The image, or the video's frames side by side."""
    return strip(media) if medium(media) == "video" else media


def picture(run: Run, media: Media) -> Image.Image:
    """The kept-token picture of a run: one frame per temporal slice of the token grid, dropped patches greyed."""
    groups = merged_cells(run)
    cells = set(kept_cells(run)).difference(*map(set, groups))
    frames = media if medium(media) == "video" else [media]
    t = run.grid[0]
    return overlay([frames[i * len(frames) // t] for i in range(t)], run.grid, cells, groups)


def build_app(model, processor, warning: str | None = None, max_new_tokens: int = 16) -> gr.Blocks:
    """The demo page for a loaded model and its processor; `warning` is shown at the top (e.g. random weights)."""

    def on_example(choice: str) -> tuple:
        if choice == UPLOAD:
            return gr.update(), gr.update(), "upload an image or a video (mp4, webm, ...) below"
        media, record = example(choice)
        return record["question"], preview(media), f"expected answer: **{record['answer']}**"

    def on_upload(upload: str | None) -> tuple:
        if not upload:
            return gr.update(), None, ""
        try:
            media = read(upload)
        except ValueError as error:
            gr.Warning(str(error))
            return UPLOAD, None, str(error)
        return UPLOAD, preview(media), f"uploaded {medium(media)}"

    def answer(
        choice: str,
        upload: str | None,
        question: str,
        method: str,
        keep: float,
        merge: bool,
        kv: str,
        weights: str,
        tokens: float,
    ) -> Iterator[tuple]:
        """Stream the stock answer, then the patched one, then the picture of what the patched model kept."""
        try:
            if not (question or "").strip():
                raise ValueError("type a question about the image or video")
            config = recipe(method, keep, kv, weights, merge)
            media = pick(choice, upload)
            shown = ["", None, "", None, None, "running the stock model..."]
            runs = []
            for side, setting in ((0, STOCK), (2, config)):
                for text, run in stream(model, processor, setting, media, question.strip(), int(tokens)):
                    shown[side] = text
                    if run is not None:
                        shown[side + 1] = run.measurements()
                        runs.append(run)
                    yield tuple(shown)
                shown[5] = "running the patched model..."
        except (ValueError, NotImplementedError) as error:
            raise gr.Error(str(error), print_exception=False) from error  # bad input: the page says why
        patched = runs[1]
        kept, total = int(patched.kept_positions.numel()), int(patched.input_positions.numel())
        shown[5] = f"the patched model kept {kept} of {total} vision tokens (measured after stage {patched.stage})"
        try:
            shown[4] = picture(patched, media)
        except ValueError as error:
            shown[5] += f"; no picture: {error}"
            gr.Warning(f"no picture: {error}")
        yield tuple(shown)

    first_media, first_record = example(FIRST)
    for _ in stream(model, processor, STOCK, first_media, first_record["question"], 1):
        pass  # warm-up: the first request's stock run is not charged one-time start-up costs
    with gr.Blocks(title="tokred demo", analytics_enabled=False) as app:
        gr.Markdown(
            f"# tokred: full vs compressed\n`{type(model).__name__}` on {model.device}. Left: the stock model. "
            "Right: the same model patched with the recipe below. Vision tokens are measured by `tokred.stats`."
        )
        if warning:
            gr.Markdown(f"**Warning:** {warning}", elem_id="model-warning")
        with gr.Row():
            with gr.Column(scale=1):
                choice = gr.Dropdown(
                    [(f"{name} ({MEDIA[kind]})", name) for name, (kind, _) in EXAMPLES.items()] + [("upload", UPLOAD)],
                    value=FIRST,
                    label="example (synthetic test split) or your upload",
                )
                question = gr.Textbox(first_record["question"], label="question")
                with gr.Row():
                    method = gr.Dropdown([STOCK, *PRUNERS], value="fastv", label="method")
                    keep = gr.Slider(0.05, 1.0, value=0.5, step=0.05, label="keep ratio")
                    merge = gr.Checkbox(False, label="merge dropped tokens into kept ones")
                with gr.Row():
                    kv = gr.Dropdown(list(tokred.KV_SCHEMES), value="none", label="KV-cache scheme")
                    weights = gr.Dropdown(list(tokred.WEIGHT_BITS), value="none", label="weight bits")
                    tokens = gr.Slider(1, 64, value=max_new_tokens, step=1, label="max new tokens")
                go = gr.Button("answer", variant="primary")
                status = gr.Markdown(f"expected answer: **{first_record['answer']}**", elem_id="status")
                upload = gr.File(label="upload an image or a video", file_types=["image", "video"], height=120)
                view = gr.Image(preview(first_media), label="input", interactive=False, height=240, **IMAGE)
            with gr.Column(scale=2):
                with gr.Row():
                    with gr.Column(elem_id="stock-panel"):
                        gr.Markdown("### stock model")
                        stock_answer = gr.Textbox(label="answer (stock)", lines=3)
                        stock_figures = gr.JSON(label="measured (stock)")
                    with gr.Column(elem_id="patched-panel"):
                        gr.Markdown("### patched model")
                        patched_answer = gr.Textbox(label="answer (patched)", lines=3)
                        patched_figures = gr.JSON(label="measured (patched)")
                kept = gr.Image(
                    label="what the patched model kept (dropped patches greyed, merged groups outlined)", **IMAGE
                )
        choice.input(on_example, choice, [question, view, status], api_name="example")  # user picks only
        upload.change(on_upload, upload, [choice, view, status], api_name="upload")
        go.click(
            answer,
            [choice, upload, question, method, keep, merge, kv, weights, tokens],
            [stock_answer, stock_figures, patched_answer, patched_figures, kept, status],
            api_name="compare",
            concurrency_limit=1,  # one model, patched in place: one request at a time
        )
    return app


def launch(app: gr.Blocks, port: int | None = None, host: str = "127.0.0.1") -> str:
    """Start serving `app` locally in the background (no share link) and return its URL."""
    _, url, _ = app.queue().launch(
        server_name=host, server_port=port, share=False, show_error=True, prevent_thread_lock=True, quiet=True
    )
    return url
