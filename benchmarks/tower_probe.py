"""Can a from-scratch vision tower learn what ShapesVQA asks? Tower + linear probe only, no LLM.

    python benchmarks/tower_probe.py --family qwen2_5_vl --minutes 5 [--device cuda] [--full-attention]

Trains the family's vision tower (the sizes `python -m tokred.zoo.train` uses) together with the training
script's probe, and every `--every` steps prints the probe's held-out accuracy on 64 test images: each
object's colour and shape read from the mean of its tokens (and the shape of each scene's tiny object), and
each token's quadrant. Chance is 1/8, 1/7 and 1/4. This isolates the vision side when a trained VLM stays
at its answer priors; it is how we found that shapes placed anywhere stay at chance for an hour of CPU
while shapes that fill whole token cells (the datasets' default `cell=28`) are learned in minutes.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokred.zoo import build
from tokred.zoo.datasets import sample
from tokred.zoo.datasets.shapes import smallest
from tokred.zoo.train import Probe, collate_probes, probe_targets, vision_config

SIDE = 16  # 448 px / 28 px tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="qwen2_5_vl", choices=["qwen2_5_vl", "llava"])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-attention", action="store_true", help="Qwen2.5-VL: no windowed blocks")
    args = parser.parse_args()

    vision = vision_config(args.family, 96, 4, 448)
    if args.full_attention:
        vision["fullatt_block_indexes"] = list(range(4))
    path = build(args.family, vision=vision, image_size=448, hidden_size=128, num_attention_heads=4)
    model = AutoModelForImageTextToText.from_pretrained(path).to(args.device)
    processor = AutoProcessor.from_pretrained(path)
    probe = Probe(128).to(args.device)
    params = [*model.model.get_submodule("visual" if args.family != "llava" else "vision_tower").parameters()]
    params += [*model.model.multi_modal_projector.parameters()] if args.family == "llava" else []
    optimizer = torch.optim.AdamW([*params, *probe.parameters()], lr=args.lr)

    def tokens(records) -> torch.Tensor:
        inputs = processor.image_processor(images=[image for _, image in records], return_tensors="pt").to(args.device)
        features = model.model.get_image_features(**{k: v for k, v in inputs.items() if k != "image_sizes"})
        features = getattr(features, "pooler_output", features)  # transformers >= 5.2x wraps the features
        return torch.cat([f.reshape(-1, 128) for f in features])  # per image, raster order

    def targets(records) -> list[torch.Tensor]:
        return [t.to(args.device) for t in collate_probes([probe_targets(r, (1, SIDE, SIDE), 448) for r, _ in records])]

    test = [sample("shapes", "test", i) for i in range(64)]
    test_weights, expected, quadrants = targets(test)
    tiny = torch.cat([torch.arange(len(r["objects"])) == smallest(r["objects"]) for r, _ in test]).to(args.device)
    start, step = time.monotonic(), 0
    while time.monotonic() - start < 60 * args.minutes:
        records = [sample("shapes", "train", step * args.batch_size + i) for i in range(args.batch_size)]
        loss = probe.loss(tokens(records), *targets(records))
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        step += 1
        if step % args.every == 0:
            with torch.no_grad():
                guess = [x.argmax(-1) for x in probe.logits(tokens(test), test_weights)]
            right = [(g == y).float() for g, y in zip(guess, (expected[:, 0], expected[:, 1], quadrants), strict=True)]
            colour, shape, quadrant = (r.mean().item() for r in right)
            print(
                f"step {step} ({time.monotonic() - start:.0f} s) loss {loss.item():.3f}  colour {colour:.2f}  "
                f"shape {shape:.2f}  shape of the tiny one {right[1][tiny].mean().item():.2f}  quadrant {quadrant:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
