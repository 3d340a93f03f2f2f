"""`tokred demo`: the kept-patch picture, recipes and uploads, and the real Gradio page driven by gradio_client
and headless Chromium on the default checkpoint (a random-weight build until a trained one ships)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tokred
from tokred.cli import default_model, main
from tokred.demo.compare import PRUNERS, Run, kept_cells, merged_cells, recipe, stream
from tokred.demo.media import FRAMES, example, read
from tokred.demo.overlay import CELL, GAP, OUTLINE, grey, overlay
from tokred.zoo import build, load
from tokred.zoo.prompts import chat, media_inputs

RED, GREEN = (255, 0, 0), (10, 200, 30)
RED_GREY, GREEN_GREY = 40 + 76 // 4, 40 + 124 // 4  # PIL luminance of RED is 76, of GREEN 124


# -- the picture, without Gradio -----------------------------------------------------------------------------------
def test_dropped_cells_turn_grey_and_kept_cells_keep_their_pixels():
    frames = [Image.new("RGB", (30, 20), RED), Image.new("RGB", (7, 5), GREEN)]
    picture = np.asarray(overlay(frames, (2, 2, 3), kept=[0, 4, 7, 11], cell=4))
    assert picture.shape == (8, 2 * 12 + GAP, 3)
    assert (picture[:, 12 : 12 + GAP] == 255).all()
    for index in range(12):
        t, y, x = index // 6, index % 6 // 3, index % 3
        box = picture[y * 4 : y * 4 + 4, t * (12 + GAP) + x * 4 : t * (12 + GAP) + x * 4 + 4]
        colour, dim = (RED, RED_GREY) if t == 0 else (GREEN, GREEN_GREY)
        expected = colour if index in (0, 4, 7, 11) else (dim, dim, dim)
        assert (box == expected).all(), index


def test_merged_groups_keep_their_pixels_inside_an_outline():
    picture = np.asarray(overlay([Image.new("RGB", (6, 6), RED)], (1, 3, 3), kept=[8], merged=[[0, 1, 3]], cell=6))
    assert (picture[0:2, 0:12] == OUTLINE).all()  # top edge of cells 0 and 1
    assert (picture[2:4, 2:10] == RED).all()  # inside the group, across the shared edge of cells 0 and 1
    assert (picture[4:6, 2:4] == RED).all()  # across the shared edge of cells 0 and 3
    assert (picture[4:6, 6:12] == OUTLINE).all()  # bottom edge of cell 1, which borders dropped cell 4
    assert (picture[6:12, 0:2] == OUTLINE).all() and (picture[6:12, 4:6] == OUTLINE).all()  # cell 3: left, right
    assert (picture[8:10, 8:10] == RED_GREY).all()  # cell 4: dropped
    assert (picture[12:18, 12:18] == RED).all()  # cell 8: kept


def test_grey_is_the_dimmed_luminance():
    assert (grey(np.array([[RED, GREEN]], dtype=np.uint8)) == [[[RED_GREY] * 3, [GREEN_GREY] * 3]]).all()


@pytest.mark.parametrize(
    ("frames", "kept", "message"),
    [(2, [0], r"1 temporal slice\(s\) but 2 frame\(s\)"), (1, [4], r"\[4\] are outside the 1x2x2 token grid")],
)
def test_overlay_refuses_frames_or_cells_that_do_not_fit_the_grid(frames, kept, message):
    with pytest.raises(ValueError, match=message):
        overlay([Image.new("RGB", (4, 4))] * frames, (1, 2, 2), kept)


def _run(grid, inputs: list[int], kept: list[int]) -> Run:
    return Run(1.0, None, 0, None, "pre_llm", torch.tensor(inputs), torch.tensor(kept), grid)


def test_kept_positions_map_to_grid_cells_in_raster_order():
    assert kept_cells(_run((2, 1, 3), [5, 6, 7, 9, 10, 11], [6, 9, 11])) == [1, 3, 5]


@pytest.mark.parametrize(
    ("grid", "message"),
    [((1, 2, 3), "token grid 1x2x3 has 6 cells but the input holds 5 vision tokens"), (None, "token grid known")],
)
def test_a_grid_that_does_not_fit_the_tokens_is_an_error(grid, message):
    with pytest.raises(ValueError, match=message):
        kept_cells(_run(grid, [1, 2, 3, 4, 5], [2]))


def test_llava_tokens_sit_on_its_fixed_grid(zoo_root):
    model, processor = load(build("llava", zoo_root / "llava"), attn_implementation="sdpa")
    *_, (answer, run) = stream(model, processor, recipe("random", 0.5), example("shapes #0")[0], "what colour?", 2)
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    assert run.grid == (1, side, side) and run.stage == "pre_llm"
    assert len(kept_cells(run)) == run.kept_positions.numel() == side * side // 2


def test_merged_groups_reach_the_picture_as_cells(zoo_root):
    model, processor = load(build("llava", zoo_root / "llava"), attn_implementation="sdpa")
    *_, (_, run) = stream(model, processor, recipe("random", 0.25, merge=True), example("shapes #0")[0], "what?", 2)
    groups = merged_cells(run)
    kept = set(kept_cells(run))
    assert groups and all(len(g) > 1 and len(kept & set(g)) == 1 for g in groups)  # each group: one kept slot
    assert sorted(c for g in groups for c in g) == sorted({c for g in groups for c in g})  # disjoint
    assert len(kept) + sum(len(g) - 1 for g in groups) == run.input_positions.numel()  # every token accounted for


# -- recipes and uploads --------------------------------------------------------------------------------------------
def test_recipe_controls_become_patch_configs():
    assert recipe("none", 0.3) == tokred.Config() == tokred.Config.parse("none")
    assert recipe("random", 0.25) == tokred.Config(prune=tokred.Random(keep=0.25))
    assert recipe("random", 0.25, merge=True) == tokred.Config(prune=tokred.Random(keep=0.25, merge=True))
    assert recipe("temporal_dedup", 0.25) == tokred.Config(prune=tokred.TemporalDedup())  # no token budget
    assert "kivi" not in PRUNERS and "temporal_dedup" in PRUNERS  # KV schemes have their own menu


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fastv", 0.5, "zipcache"), r"unknown kv scheme 'zipcache'; kv schemes are: none, int8, kivi, vidkv"),
        (
            ("fastv", 0.5, "none", "int4"),
            r"unknown weights scheme 'int4'; weights schemes are: none, layerbits, uniform_bits",
        ),
        (("none", 0.5, "fastv"), "unknown kv scheme 'fastv'"),
        (
            ("prumerge", 0.5),
            f"unknown method 'prumerge'; methods are: none, {', '.join(PRUNERS)}",
        ),
        (("random", 0.0), r"keep must be in \(0, 1\]"),
    ],
)
def test_unsupported_recipe_values_are_explained(args, message):
    with pytest.raises(ValueError, match=message):
        recipe(*args)


def test_uploads_read_as_image_or_video_frames(tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(24):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 10 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames = read(path)
    assert len(frames) == FRAMES and frames[0].size == (64, 48)
    Image.new("RGB", (9, 7), RED).save(tmp_path / "red.png")
    assert read(tmp_path / "red.png").getpixel((3, 3)) == RED


def test_an_unreadable_file_is_explained(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(
        ValueError, match=r"could not read .notes.png.: not an image \(UnidentifiedImageError\) and not a video"
    ):
        read(tmp_path / "notes.png")


def test_cli_demo_explains_an_unknown_model(capsys):
    pytest.importorskip("gradio")
    with pytest.raises(SystemExit):
        main(["demo", "--model", "no-such-model"])
    assert "tokred demo: error: no checkpoint named or at 'no-such-model'" in capsys.readouterr().err


# -- the page ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page():
    """The demo of the default checkpoint, served headless on a free local port, and a gradio_client on it."""
    app_module = pytest.importorskip("tokred.demo.app")
    client_module = pytest.importorskip("gradio_client")
    path, warning = default_model()
    model, processor = load(path, attn_implementation="sdpa")
    app = app_module.build_app(model, processor, warning, max_new_tokens=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = app_module.launch(app, port)
    yield SimpleNamespace(
        url=url, model=model, processor=processor, warning=warning, client=client_module.Client(url, verbose=False)
    )
    app.close()


def ask(page, choice: str, method: str, keep: float, question: str | None = None, upload=None, kv: str = "none"):
    """The page's final outputs for one request, as a person would fill the form."""
    question = example(choice)[1]["question"] if question is None else question
    return page.client.predict(choice, upload, question, method, keep, False, kv, "none", 4, api_name="/compare")


def direct(page, choice: str, config) -> tuple[tokred.Stats, tuple[int, int, int], list]:
    """tokred.stats of a plain generate() on the example, its token grid from the processor, and its frames."""
    media, record = example(choice)
    task, key = ("motion", "video") if isinstance(media, list) else ("shapes", "image")
    inputs = media_inputs(page.processor, task, [chat(page.processor, task, record["question"])], [media])
    with tokred.patched(page.model, config):
        page.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        stats = tokred.stats(page.model)
    merge = page.processor.image_processor.merge_size
    t, h, w = inputs[f"{key}_grid_thw"][0].tolist()
    frames = media if key == "video" else [media]
    return stats, (t, h // merge, w // merge), [frames[i * len(frames) // t] for i in range(t)]


def dropped(picture_path: str, frames: list, grid: tuple[int, int, int]) -> set[int]:
    """Cells whose pixels in the page's picture are the greyed reference; every other cell must be untouched."""
    t, h, w = grid
    reference = np.asarray(overlay(frames, grid, range(t * h * w)))
    greyed = grey(reference)
    picture = np.asarray(Image.open(picture_path).convert("RGB"))
    assert picture.shape == reference.shape
    out = set()
    for index in range(t * h * w):
        i, y, x = index // (h * w), index % (h * w) // w, index % w
        left = i * (w * CELL + GAP) + x * CELL
        box = np.s_[y * CELL : (y + 1) * CELL, left : left + CELL]
        if (picture[box] == greyed[box]).all():
            out.add(index)
        else:
            assert (picture[box] == reference[box]).all(), f"cell {index} is neither kept nor greyed"
    return out


@pytest.mark.parametrize(("choice", "method"), [("shapes #0", "none"), ("motion #0", "fastv")])
def test_nothing_removed_answers_like_stock_and_greys_nothing(page, choice, method):
    stock, stock_figures, patched, patched_figures, picture, status = ask(page, choice, method, 1.0)
    assert patched == stock and patched.strip()
    assert patched_figures["vision tokens kept"] == stock_figures["vision tokens kept"]
    assert patched_figures["vision tokens kept"] == patched_figures["vision tokens in"]
    assert patched_figures["peak memory (MiB)"] == "n/a on CPU"
    assert patched_figures["KV cache bytes"] == stock_figures["KV cache bytes"] > 0
    stats, grid, frames = direct(page, choice, "none")
    assert stats.vision_tokens["input"] == [patched_figures["vision tokens in"]] == [int(np.prod(grid))]
    assert dropped(picture, frames, grid) == set()
    assert "kept" in status


@pytest.mark.parametrize(
    ("choice", "method", "stage"), [("shapes #0", "random", "pre_llm"), ("motion #0", "fastv", "llm")]
)
def test_half_kept_is_measured_and_pictured(page, choice, method, stage):
    job = page.client.submit(
        choice, None, example(choice)[1]["question"], method, 0.5, False, "none", "none", 4, api_name="/compare"
    )
    stock, stock_figures, _, patched_figures, picture, _ = job.result()
    stats, grid, frames = direct(page, choice, tokred.Config(prune=tokred.METHODS[method](keep=0.5)))
    kept = stats.kept_positions[stage][0]
    assert patched_figures["vision tokens kept"] == stats.vision_tokens[stage][0] == len(kept)
    assert patched_figures["measured after stage"] == stage
    assert stock_figures["vision tokens kept"] == stock_figures["vision tokens in"] == int(np.prod(grid))
    cells = torch.searchsorted(stats.kept_positions["input"][0], kept).tolist()
    greyed = dropped(picture, frames, grid)
    assert len(greyed) == patched_figures["vision tokens in"] - patched_figures["vision tokens kept"]
    assert greyed == set(range(int(np.prod(grid)))) - set(cells)
    assert any(update[0] and not update[2] for update in job.outputs())  # stock answered before patched began


def test_an_uploaded_picture_answers_like_the_same_example(page, tmp_path):
    from gradio_client import handle_file

    media, record = example("shapes #1")
    media.save(tmp_path / "scene.png")
    uploaded = ask(page, "upload", "random", 0.5, record["question"], handle_file(tmp_path / "scene.png"))
    bundled = ask(page, "shapes #1", "random", 0.5)
    assert (uploaded[0], uploaded[2]) == (bundled[0], bundled[2])
    for key in ("vision tokens in", "vision tokens kept", "KV cache bytes"):
        assert uploaded[1][key] == bundled[1][key] and uploaded[3][key] == bundled[3][key]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"question": "   "}, "type a question"),
        ({"choice": "upload"}, "upload an image or a video, or pick one of the examples"),
        ({"upload": "notes.png", "choice": "upload"}, "could not read 'notes.png': not an image"),
        ({"kv": "zipcache"}, "zipcache is not in the list of choices"),
    ],
)
def test_bad_input_shows_a_message(page, tmp_path, kwargs, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    if "upload" in kwargs:
        (tmp_path / kwargs["upload"]).write_text("not a picture")
        kwargs["upload"] = handle_file(tmp_path / kwargs["upload"])
    with pytest.raises(AppError, match=message) as error:
        ask(page, **{"choice": "shapes #0", "method": "fastv", "keep": 0.5, "question": "what colour?"} | kwargs)
    assert "Traceback" not in str(error.value)


def test_the_page_renders_in_chromium(page, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs Debian's package where apt-get exists)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=15000",
        "--window-size=1400,1000",
    ]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.url], capture_output=True, text=True, timeout=120)
    for panel in ('id="stock-panel"', 'id="patched-panel"', "answer (stock)", "answer (patched)"):
        assert panel in dom.stdout
    assert ('id="model-warning"' in dom.stdout) == bool(page.warning)
    shot = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", page.url], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (1000, 1400) and pixels.std() > 10  # drawn, not a blank page
