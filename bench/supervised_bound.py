"""How much of the embedded set's classification target an image tower can learn in a budget.

Trains the tower supervised (cross-entropy on the largest object's shape, the label zero-shot
classification scores) for the demo's steps and batch, and prints train and test accuracy four
times along the way. Contrastive training sees that label only through noisy text, so this is an
upper bound on what zero-shot and the linear probe can show after the same number of steps.

    python bench/supervised_bound.py --data demo-out/data --steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dreamlip.eval.datasets import load_image
from dreamlip.model import create_model


def _split(root: Path, split: str, transform) -> tuple[torch.Tensor, torch.Tensor]:
    records = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
    images = torch.stack([transform(load_image(str(root / r["image"]))) for r in records])
    return images, torch.tensor([r["label"] for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dreamlip demo-data directory")
    parser.add_argument("--model", default="DreamLIP-ViT-Tiny-64")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the curve as JSON here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.data)
    model, _, eval_transform = create_model(args.model)
    visual = model.clip.visual
    # Decoded once: the bound is about what the tower learns per step, not about the loader.
    train_x, train_y = _split(root, "train", eval_transform)
    test_x, test_y = _split(root, "test", eval_transform)
    classes = len(json.loads((root / "classes.json").read_text())["classification"]["names"])
    head = torch.nn.Linear(visual.output_dim, classes)
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))),
    )
    generator = torch.Generator().manual_seed(args.seed)
    curve, started = [], time.perf_counter()

    def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return 100 * float((head(visual(x)).argmax(1) == y).float().mean())

    for step in range(1, args.steps + 1):
        index = torch.randint(len(train_x), (args.batch_size,), generator=generator)
        loss = F.cross_entropy(head(visual(train_x[index])), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % max(1, args.steps // 4) == 0 or step == args.steps:
            point = {"step": step, "train": accuracy(train_x[:300], train_y[:300]), "test": accuracy(test_x, test_y)}
            curve.append(point)
            print(f"step {step}: train {point['train']:.1f} test {point['test']:.1f} "
                  f"(chance {100 / classes:.1f}; {time.perf_counter() - started:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "curve": curve}, indent=2))


if __name__ == "__main__":
    main()
