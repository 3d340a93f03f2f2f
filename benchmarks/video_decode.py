"""tokred.video's keyframe-parallel decoding against one sequential reader, on a long clip written here.

The clip (default 900 frames of 448x448 at 30 fps, a keyframe every 30 frames, H.264 where PyAV has it, else
MPEG-4) shows a moving gradient, so every frame decodes differently. Each setting samples the same frames
(uniform, `--frames`); rounds are interleaved (one warm-up, then the median of `--repeats`) and the ratio is
sequential / parallel time. Frames are checked equal. Results go to `results/video_decode.json` (`--out`)
and a markdown table.

    python benchmarks/video_decode.py [--frames 64] [--length 900] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from tokred import video


def write_clip(path: Path, length: int, size: int, fps: int = 30, gop: int = 30) -> str:
    """A `length`-frame clip of a moving gradient; returns the codec used."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    y, x = np.mgrid[0:size, 0:size]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(length):
            pixels = np.stack([(x + 3 * i) % 256, (y + 2 * i) % 256, (x + y + i) % 256], -1).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return codec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=64, help="frames sampled uniformly")
    parser.add_argument("--length", type=int, default=900, help="frames in the generated clip")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="results/video_decode.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        clip = Path(folder) / "clip.mp4"
        codec = write_clip(clip, args.length, args.size)
        settings = {
            f"{backend} {'parallel' if parallel else 'sequential'}": {"backend": backend, "parallel": parallel}
            for backend in video.BACKENDS
            for parallel in (False, True)
        }
        times: dict[str, list[float]] = {name: [] for name in settings}
        frames: dict[str, list] = {}
        for round_ in range(args.repeats + 1):
            for name, options in settings.items():
                start = time.perf_counter()
                got = video.load(clip, num_frames=args.frames, workers=args.workers, **options)
                if round_:
                    times[name].append(time.perf_counter() - start)
                frames[name] = [np.asarray(f) for f in got.frames]
    rows = []
    for backend in video.BACKENDS:
        sequential, parallel = (statistics.median(times[f"{backend} {m}"]) for m in ("sequential", "parallel"))
        same = all(
            np.array_equal(a, b)
            for a, b in zip(frames[f"{backend} sequential"], frames[f"{backend} parallel"], strict=True)
        )
        rows.append(
            {
                "backend": backend,
                "sequential_s": sequential,
                "parallel_s": parallel,
                "speedup": sequential / parallel,
                "same_frames": same,
            }
        )
    result = {
        "clip": {"frames": args.length, "size": args.size, "codec": codec, "keyframe_every": 30},
        "sampled": args.frames,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.frames} of {args.length} frames, {args.size}px {codec}, {args.workers} workers")
    print("| backend | sequential s | parallel s | speed-up | same frames |\n|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['sequential_s']:.2f} | {row['parallel_s']:.2f} | "
            f"{row['speedup']:.2f}x | {row['same_frames']} |"
        )


if __name__ == "__main__":
    main()
