"""Can a from-scratch vision tower learn what ShapesVQA asks? Tower + linear probe only, no LLM.

    python benchmarks/tower_probe.py --family qwen2_5_vl --minutes 5 [--device cuda] [--full-attention]

Trains the family's vision tower (the sizes `python -m tokred.zoo.train` uses) together with the training
script's probe, and every `--every` steps prints the probe's held-out accuracy on 32 test images: colour and
shape on the cells an object covers, shape on object-centre cells, and quadrant on all cells. Chance is about
1/8, 1/7 and 1/4. This isolates the vision side when a trained VLM stays at its answer priors.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from tokred.zoo import build
from tokred.zoo.datasets import sample
from tokred.zoo.train import PROBE_CLASSES, Probe, probe_targets, vision_config

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

    def targets(records) -> torch.Tensor:
        return torch.cat([probe_targets(r, (1, SIDE, SIDE), 448) for r, _ in records]).to(args.device)

    test = [sample("shapes", "test", i) for i in range(32)]
    expected = targets(test)
    start, step = time.monotonic(), 0
    while time.monotonic() - start < 60 * args.minutes:
        records = [sample("shapes", "train", step * args.batch_size + i) for i in range(args.batch_size)]
        loss = probe.loss(tokens(records), targets(records))
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        step += 1
        if step % args.every == 0:
            with torch.no_grad():
                logits = probe.head(tokens(test)).split(PROBE_CLASSES, dim=-1)
            guess = [x.argmax(-1) for x in logits]
            covered, centre = expected[:, 1] > 0, expected[:, 2] == 1
            everywhere = torch.ones_like(covered)
            colour, shape, at_centre, quadrant = (
                (guess[head][where] == expected[where, head]).float().mean().item()
                for head, where in ((0, covered), (1, covered), (1, centre), (3, everywhere))
            )
            print(
                f"step {step} ({time.monotonic() - start:.0f} s) loss {loss.item():.3f}  colour {colour:.2f}  "
                f"shape {shape:.2f}  shape@centre {at_centre:.2f}  quadrant {quadrant:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
