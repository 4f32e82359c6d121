"""How often is a training text also true of another image in the batch (a false negative)?

A sentence of a long caption mostly describes one object. In InfoNCE every other image of the
batch is a negative for it, but another image may hold an object that fits the same sentence. This
counts, from the embedded dataset's object metadata, the expected number of other images in a
random batch that hold every object a text names, for texts naming 1, 2 or all of an image's
objects (a sub-caption, merged sub-captions, a whole long caption), matching objects on
colour alone (what a model that has not learned shapes yet can tell apart), on shape and colour,
and on shape, colour, size and position as the sentences state them.

    python bench/subcaption_ambiguity.py --data ablation-out/data --batch 64
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def expected_false_negatives(images: list[set[tuple]], names: int | None, batch: int, draws: int, rng: random.Random) -> float:
    """Mean count of the other images in a batch holding every object of a text about ``names`` objects
    of its image (None: all of them)."""
    total, counted = 0, 0
    while counted < draws:
        members = rng.sample(range(len(images)), batch)
        own = images[members[0]]
        if names is not None and len(own) < names:
            continue
        described = own if names is None else set(rng.sample(sorted(own), names))
        total += sum(described <= images[other] for other in members[1:])
        counted += 1
    return total / counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a demo-data directory (its train.jsonl)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--draws", type=int, default=5000)
    args = parser.parse_args()

    records = [json.loads(line) for line in (Path(args.data) / "train.jsonl").read_text().splitlines()]
    keys = {
        "colour": ("color",),
        "shape+colour": ("shape", "color"),
        "shape+colour+size+position": ("shape", "color", "size", "position"),
    }
    print(f"{len(records)} training images, batch {args.batch}: other images in the batch that fit the text")
    print(f"{'objects matched on':28s} {'1 object':>9s} {'2 objects':>10s} {'all':>8s}")
    for label, fields in keys.items():
        images = [{tuple(obj[f] for f in fields) for obj in record["objects"]} for record in records]
        rng = random.Random(0)
        cells = [expected_false_negatives(images, names, args.batch, args.draws, rng) for names in (1, 2, None)]
        print(f"{label:28s} {cells[0]:9.2f} {cells[1]:10.2f} {cells[2]:8.3f}")


if __name__ == "__main__":
    main()
