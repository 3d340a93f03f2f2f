"""tokred.zoo.datasets: ShapesVQA and MotionVQA regenerate bit for bit, every answer follows from the
recorded scene (recomputed here independently), and the pixels show what the records say."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokred.zoo import datasets
from tokred.zoo.datasets import COLOURS, common, motion, shapes

N_SHAPES = 100
N_MOTION = 40
SIZE = 224  # ShapesVQA canvas (default)
FRAMES = 16  # MotionVQA clip length (default)


@pytest.fixture(scope="module")
def shape_samples() -> list[tuple[dict, Image.Image]]:
    return [datasets.sample("shapes", "train", i) for i in range(N_SHAPES)]


@pytest.fixture(scope="module")
def motion_samples() -> list[tuple[dict, list[Image.Image]]]:
    return [datasets.sample("motion", "test", i) for i in range(N_MOTION)]


def digests(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def only(items: list) -> object:
    """The single element of ``items`` (asserting there is exactly one)."""
    assert len(items) == 1, items
    return items[0]


# ---------------------------------------------------------------- files, seeds, API

SMALL = {"shapes": {"n_train": 6, "n_test": 3}, "motion": {"n_train": 3, "n_test": 2, "frames": 12}}


@pytest.mark.parametrize("kind", ["shapes", "motion"])
def test_regeneration_is_bit_identical_and_seeds_differ(tmp_path: Path, kind: str):
    first = digests(datasets.generate(kind, tmp_path / "a", **SMALL[kind]))
    second = digests(datasets.generate(kind, tmp_path / "b", **SMALL[kind]))
    assert first == second
    again = digests(datasets.generate(kind, tmp_path / "a", **SMALL[kind]))  # replaces the first generation
    assert again == first
    media = "images/train_000000.png" if kind == "shapes" else "videos/train_000000/frame_011.png"
    assert {"train.jsonl", "test.jsonl", "meta.json", media} <= set(first)
    other = digests(datasets.generate(kind, tmp_path / "c", seed=1, **SMALL[kind]))
    assert other.keys() == first.keys()
    assert all(first[name] != other[name] for name in first)


@pytest.mark.parametrize("kind", ["shapes", "motion"])
def test_files_match_in_memory_samples(tmp_path: Path, kind: str):
    """Sample i of a split is the same alone as inside a generation; meta.json round-trips the parameters."""
    root = tmp_path / "data"
    datasets.generate(kind, root, seed=3, **SMALL[kind])
    meta = json.loads((root / kind / "meta.json").read_text())
    assert meta["kind"] == kind and meta["seed"] == 3 and meta["format_version"] == datasets.FORMAT_VERSION
    assert meta["counts"] == {"train": SMALL[kind]["n_train"], "test": SMALL[kind]["n_test"]}
    assert meta["answers"] == datasets.ANSWERS[kind]
    for split in ("train", "test"):
        records = datasets.load(kind, root, split)
        assert len(records) == meta["counts"][split]
        for index in reversed(range(len(records))):
            record, media = datasets.sample(kind, split, index, seed=3, **meta["params"])
            assert records[index] == record
            loaded = datasets.open_media(kind, root, record)
            frames = [media] if kind == "shapes" else media
            stored = [loaded] if kind == "shapes" else loaded
            assert len(stored) == len(frames)
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(stored, frames, strict=True))
    train, _ = datasets.sample(kind, "train", 0, seed=3)
    test, _ = datasets.sample(kind, "test", 0, seed=3)
    assert train["objects"] != test["objects"]


def test_load_missing_split_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "shapes" / "test.jsonl"))) as error:
        datasets.load("shapes", tmp_path, "test")
    assert "generate(" in str(error.value)


def test_bad_arguments_are_explained(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown dataset kind"):
        datasets.sample("nope", "train", 0)
    with pytest.raises(ValueError, match="unknown split"):
        datasets.sample("shapes", "val", 0)
    with pytest.raises(TypeError, match="known: .*smallest_share"):
        datasets.sample("shapes", "train", 0, smalest_share=0.5)
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a generated dataset"):
        datasets.generate("shapes", tmp_path, n_train=1, n_test=0)
    assert (tmp_path / "shapes" / "mine.txt").read_text() == "keep me"


# ---------------------------------------------------------------- ShapesVQA


def solve_shapes(question: str, objects: list[dict]) -> tuple[str, list[int]]:
    """The answer and the objects it rests on, from the question text and the scene alone."""
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        i = only([i for i, o in enumerate(objects) if o["shape"] == m[1]])
        return objects[i]["colour"], [i]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        i = only([i for i, o in enumerate(objects) if o["colour"] == m[1]])
        return objects[i]["shape"], [i]
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        hits = [i for i, o in enumerate(objects) if o["colour"] == m[1]]
        return str(len(hits)), hits
    if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        hits = [i for i, o in enumerate(objects) if (o["colour"], o["shape"]) == (m[1], m[2])]
        return ("yes" if hits else "no"), hits
    m = re.fullmatch(r"which quadrant holds the (\w+)\?", question)
    i = only([i for i, o in enumerate(objects) if o["shape"] == m[1]])
    x, y = objects[i]["cx"], objects[i]["cy"]
    assert abs(x - SIZE / 2) >= 24 and abs(y - SIZE / 2) >= 24
    return ("top" if y < SIZE / 2 else "bottom") + ("left" if x < SIZE / 2 else "right"), [i]


def smallest_index(objects: list[dict]) -> int:
    return int(np.argmin([o["size"] for o in objects]))


def test_shapes_answers_follow_from_the_scene(shape_samples):
    fields = {"id", "image", "question", "answer", "type", "about_smallest", "targets", "split", "objects"}
    for record, _ in shape_samples:
        objects = record["objects"]
        assert set(record) == fields and record["image"] == f"images/{record['id']}.png"
        assert all(set(o) == {"shape", "colour", "cx", "cy", "size"} for o in objects)
        assert (record["answer"], record["targets"]) == solve_shapes(record["question"], objects)
        assert record["answer"] in shapes.ANSWERS
        assert re.fullmatch(r"[a-z0-9]+", record["answer"])
        tiny = smallest_index(objects)
        if record["about_smallest"]:
            assert record["targets"] == [tiny] and record["type"] in shapes.SMALLEST_TYPES
        else:  # answer (and well-posedness) unchanged without the smallest object
            assert tiny not in record["targets"] or record["type"] == "exists"
            rest = objects[:tiny] + objects[tiny + 1 :]
            assert solve_shapes(record["question"], rest)[0] == record["answer"]


def test_shapes_mix_of_templates_and_answers(shape_samples):
    records = [record for record, _ in shape_samples]
    assert {r["type"] for r in records} == set(shapes.DEFAULT_TYPES)
    assert {r["answer"] for r in records if r["type"] == "exists"} == {"yes", "no"}
    assert len({r["question"] for r in records}) > 30
    counts = [datasets.sample("shapes", "test", i, types=shapes.TYPES)[0] for i in range(200)]
    assert {"0", "1", "2", "3"} <= {r["answer"] for r in counts if r["type"] == "count"}
    for record in counts:
        assert (record["answer"], record["targets"]) == solve_shapes(record["question"], record["objects"])


def test_about_smallest_share_is_exact(shape_samples):
    assert sum(record["about_smallest"] for record, _ in shape_samples) == 30
    assert sum(common.is_about_smallest(i, 0.25) for i in range(40)) == 10
    assert all(datasets.sample("shapes", "test", i, smallest_share=1.0)[0]["about_smallest"] for i in range(3))


def test_shapes_scene_geometry(shape_samples):
    for record, _ in shape_samples:
        objects = record["objects"]
        assert 3 <= len(objects) <= 8
        sizes = sorted(o["size"] for o in objects)
        assert 16 <= sizes[0] <= 22 and sizes[1] >= 36 and sizes[-1] <= 120
        for o in objects:
            r = o["size"] / 2
            assert r <= o["cx"] <= SIZE - r and r <= o["cy"] <= SIZE - r
        for a, b in itertools.combinations(objects, 2):
            gap = max(abs(a["cx"] - b["cx"]), abs(a["cy"] - b["cy"])) - (a["size"] + b["size"]) / 2
            assert gap >= 8, (a, b)


def test_shapes_pixels_show_the_objects(shape_samples):
    for record, image in shape_samples:
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        for o in record["objects"]:
            assert image.getpixel((o["cx"], o["cy"])) == COLOURS[o["colour"]], o


def test_background_is_never_near_a_palette_colour(shape_samples):
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    for record, image in shape_samples[:8]:
        pixels = np.asarray(image, dtype=np.float32)
        outside = np.ones(pixels.shape[:2], bool)
        for o in record["objects"]:
            r = o["size"] // 2 + 1
            outside[max(0, o["cy"] - r) : o["cy"] + r + 1, max(0, o["cx"] - r) : o["cx"] + r + 1] = False
        clutter = pixels[outside]
        distance = np.linalg.norm(clutter[:, None, :] - palette[None], axis=-1).min()
        assert distance > 60
        assert (clutter.max(-1) - clutter.min(-1)).max() <= 50  # low saturation


# ---------------------------------------------------------------- MotionVQA


def visible(o: dict, t: int) -> bool:
    return o["appear"] <= t < o["disappear"]


def solve_motion(question: str, objects: list[dict]) -> tuple[str, list[int]]:
    """The answer and the objects it rests on, from the question text and the tracks alone."""
    if m := re.fullmatch(r"which way did the (\w+) (\w+) move\?", question):
        i = only([i for i, o in enumerate(objects) if (o["colour"], o["shape"]) == (m[1], m[2])])
        (dx, dy) = np.subtract(objects[i]["track"][-1], objects[i]["track"][0])
        assert (dx == 0) != (dy == 0)
        return ("left" if dx < 0 else "right") if dx else ("up" if dy < 0 else "down"), [i]
    if question == "which object appeared?":
        i = only([i for i, o in enumerate(objects) if not visible(o, 0) and visible(o, FRAMES - 1)])
        return objects[i]["shape"], [i]
    if m := re.fullmatch(r"in which third of the video did the (\w+) (\w+) appear\?", question):
        i = only([i for i, o in enumerate(objects) if (o["colour"], o["shape"]) == (m[1], m[2])])
        frame = next(t for t in range(FRAMES) if visible(objects[i], t))
        thirds = {(frame + d) * 3 // FRAMES for d in (-1, 0, 1)}
        assert frame > 0 and len(thirds) == 1  # a frame clear of the thirds' borders
        return ("beginning", "middle", "end")[frame * 3 // FRAMES], [i]
    assert question == "how many objects are there at the end?"
    hits = [i for i, o in enumerate(objects) if visible(o, FRAMES - 1)]
    return str(len(hits)), hits


def test_motion_answers_follow_from_the_tracks(motion_samples):
    for record, frames in motion_samples:
        assert (record["answer"], record["targets"]) == solve_motion(record["question"], record["objects"])
        assert record["answer"] in motion.ANSWERS and record["frames"] == len(frames) == FRAMES
    assert {record["type"] for record, _ in motion_samples} == set(motion.DEFAULT_TYPES)


def test_motion_objects(motion_samples):
    for record, _ in motion_samples:
        objects = record["objects"]
        assert 2 <= len(objects) <= 5
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects)
        assert sum(o["appear"] > 0 for o in objects) <= 1
        for o in objects:
            track = np.array(o["track"])
            assert track.shape == (FRAMES, 2)
            assert 0 <= o["appear"] < o["disappear"] <= FRAMES
            if o["motion"] == "static":
                assert (track == track[0]).all()
            else:
                shift = np.array(motion.DIRECTIONS[o["motion"]]) @ (track[-1] - track[0])
                assert shift >= 52 and shift > o["size"]
                steps = np.abs(np.diff(track, axis=0)).sum(-1)
                assert set(steps.tolist()) <= {0, 28} and not steps[0::2].any()  # a cell at a time, between pairs
        for a, b in itertools.combinations(objects, 2):
            gap = np.abs(np.subtract(a["track"], b["track"])).max(-1) - (a["size"] + b["size"]) / 2
            assert gap.min() >= 6


def test_objects_fill_whole_token_cells(shape_samples, motion_samples):
    """Boxes cover whole 28 px cells (less a 4 px border); ShapesVQA's tiny object sits in the middle of one."""
    for record, _ in shape_samples:
        tiny = shapes.smallest(record["objects"])
        for i, o in enumerate(record["objects"]):
            if i == tiny:
                assert o["cx"] % 28 == o["cy"] % 28 == 14 and o["size"] < 28
            else:
                assert (o["size"] + 4) % 28 == 0 and (o["cx"] - (o["size"] + 4) // 2) % 28 == 0
                assert (o["cy"] - (o["size"] + 4) // 2) % 28 == 0
    for record, _ in motion_samples:
        for o in record["objects"]:
            assert (o["size"] + 4) % 28 == 0
            assert not ((np.array(o["track"]) - (o["size"] + 4) // 2) % 28).any()


def test_motion_pixels_follow_the_tracks(motion_samples):
    """In every frame an object's colour is at its centre exactly when it is visible; movers leave their start."""
    for record, frames in motion_samples:
        background = np.asarray(frames[0])
        for o in record["objects"]:
            colour = COLOURS[o["colour"]]
            for t, frame in enumerate(frames):
                assert (frame.getpixel(tuple(o["track"][t])) == colour) == visible(o, t), (record["id"], o, t)
            if o["motion"] != "static":
                assert frames[-1].getpixel(tuple(o["track"][0])) != colour
        changed = np.any(np.asarray(frames[-1]) != background, axis=-1).mean()
        assert changed < 0.25  # most of the picture repeats


# ---------------------------------------------------------------- every question a scene supports


@pytest.mark.parametrize("kind", ["shapes", "motion"])
def test_scene_questions_are_all_answered_correctly(kind, shape_samples, motion_samples):
    solve = solve_shapes if kind == "shapes" else solve_motion
    samples = shape_samples if kind == "shapes" else motion_samples
    rng = np.random.default_rng(0)
    for record, _ in samples:
        found = datasets.questions(kind, record, rng)
        assert record["question"] in {q["question"] for q in found} or record["type"] in (
            "count",
            "exists",
            "direction",
        )  # one of several picked
        for q in found:
            assert (q["answer"], q["targets"]) == solve(q["question"], record["objects"])
    types = {q["type"] for record, _ in samples for q in datasets.questions(kind, record, rng)}
    assert types == set(datasets.KINDS[kind].DEFAULT_TYPES)


def test_objects_cover_a_minority_of_the_tokens_and_the_smallest_one_or_two(shape_samples, motion_samples):
    """What pruning must find is small: in every scene (and every clip slot) objects paint under half of the
    LLM's 28 px token cells, and ShapesVQA's smallest object sits in one or two of them."""
    from tokred.zoo.datasets.cells import coverage

    for record, image in shape_samples:
        shares = coverage(record, (1, 8, 8), image.width)
        assert (shares.max(0) > 0).mean() < 0.5
        assert 1 <= (shares[shapes.smallest(record["objects"])] > 0).sum() <= 2
    for record, frames in motion_samples:
        shares = coverage(record, (FRAMES // 2, 8, 8), frames[0].width).reshape(-1, FRAMES // 2, 64)
        assert ((shares.max(0) > 0).mean(1) < 0.5).all()
