"""`tokred eval` on a local dataset (a directory of videos or images with a questions.jsonl): the same answers as
the synthetic task it was written from, read through `tokred.video`, and clear errors for what cannot be read."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from tokred.cli import main
from tokred.eval import evaluate, grid, questions
from tokred.eval.local import LocalDataset
from tokred.zoo import load

N = 6


def write_lossless(path, frames, fps: float = 2.0) -> None:
    """Frames as an FFV1 video (lossless: decoding gives the frames back bit for bit)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = *frames[0].size, "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")))
        container.mux(stream.encode())


def write_dataset(root, items, medium: str = "video") -> None:
    """questions.jsonl for (record, media) pairs, each medium written beside it."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (record, media) in enumerate(items):
        name = f"clip{i}.mkv" if medium == "video" else f"image{i}.png"
        if medium == "video":
            write_lossless(root / name, media)
        else:
            media.save(root / name)
        lines.append(json.dumps({medium: name, "question": record["question"], "answer": record["answer"]}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TOKRED_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def motion_clips(tmp_path_factory):
    """MotionVQA's first test questions written as a local video dataset."""
    root = tmp_path_factory.mktemp("local") / "my_clips"
    write_dataset(root, [(q.record, q.media) for q in questions("motion", N)])
    return root


def test_a_local_video_dataset_scores_like_the_task_it_was_written_from(motion_clips):
    model, processor = load("shapes-motion-qwen2_5_vl")
    settings = grid(["random"], [0.5])
    synthetic = evaluate(model, processor, settings, ["motion"], limit=N, batch_size=3, progress=False)
    local = evaluate(model, processor, settings, [str(motion_clips)], batch_size=3, progress=False)
    assert [r.task for r in local] == [str(motion_clips)] * 2
    for ours, theirs in zip(local, synthetic, strict=True):
        assert ours.answers == theirs.answers and ours.accuracy == theirs.accuracy
        assert (ours.questions, ours.vision_tokens_in, ours.vision_tokens_kept) == (
            N,
            theirs.vision_tokens_in,
            theirs.vision_tokens_kept,
        )
    data = LocalDataset.open(motion_clips)
    assert data.kind.medium == "video" and set(data.kind.answers) == {r["answer"] for r in data.records}


def test_fewer_frames_give_fewer_vision_tokens(motion_clips):
    model, processor = load("shapes-motion-qwen2_5_vl")
    full, half = (
        evaluate(model, processor, grid(), [str(motion_clips)], limit=2, progress=False, frames=f)[0] for f in (16, 8)
    )
    assert half.vision_tokens_in == full.vision_tokens_in / 2


def test_a_local_image_dataset_and_the_cli(tmp_path, capsys):
    root = tmp_path / "my_images"
    write_dataset(root, [(q.record, q.media) for q in questions("shapes", 4)], medium="image")
    recipe = "random:keep=0.25"
    main(["eval", "--model", "shapes-llava", "--tasks", str(root), "--recipes", recipe, "--out", str(tmp_path / "o")])
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    got = [(r["task"], r["questions"], r["vision_tokens_kept"]) for r in rows]
    assert got == [(str(root), 4, 64), (str(root), 4, 16)]
    assert "my_images" in capsys.readouterr().out


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "holds no questions"),
        ('{"video": "a.mkv", "question": "q?"}\n', ":1: a record needs string fields"),
        ('{"video": "a.mkv", "image": "b.png", "question": "q?", "answer": "a"}\n', "exactly one of image or video"),
        ("not json\n", ":1: not a JSON object"),
        ('{"video": "a.mkv", "question": "q?", "answer": "a", "choices": "ab"}\n', "choices must be a list"),
        (
            '{"video": "a.mkv", "question": "q?", "answer": "a"}\n'
            '{"image": "b.png", "question": "q?", "answer": "b"}\n',
            "mixes images and videos",
        ),
    ],
)
def test_a_malformed_questions_file_is_refused_with_its_line(tmp_path, content, message):
    (tmp_path / "questions.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        LocalDataset.open(tmp_path)


def test_unreadable_media_and_a_family_without_video_are_refused(tmp_path):
    model, processor = load("shapes-llava")
    root = tmp_path / "broken"
    root.mkdir()
    (root / "questions.jsonl").write_text('{"video": "a.mp4", "question": "q?", "answer": "a"}\n')
    with pytest.raises(ValueError, match="asks about videos, which llava checkpoints do not take"):
        evaluate(model, processor, grid(), [str(root)], progress=False)
    with pytest.raises(FileNotFoundError, match="a.mp4"):
        questions(str(root))
    (root / "a.mp4").write_bytes(b"\x00not a video" * 100)
    with pytest.raises(ValueError, match="a.mp4"):
        questions(str(root))
    with pytest.raises(ValueError, match="or a directory holding a questions.jsonl"):
        evaluate(model, processor, grid(), [str(tmp_path / "nowhere")], progress=False)
