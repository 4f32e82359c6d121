"""What a checkpoint's frozen image embeddings know about the embedded set's scenes.

For each attribute of the largest object (shape, colour, size, position, texture) a logistic
regression is fitted on the embeddings of training images and scored on the test split, next to
the majority-class rate; "shape present" is the mean balanced accuracy of one detector per shape
(is there a star anywhere?). It tells *which* visual facts a model has learnt, where the zero-shot
and linear-probe figures only say whether it learnt the classification target.

    python bench/attribute_probe.py --data demo-out/data --checkpoints clip=demo-out/runs/clip/model.pt \
        dreamlip=demo-out/runs/dreamlip/model.pt --out probes.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score

from dreamlip.loading import load_model
from dreamlip.eval.datasets import load_image

ATTRIBUTES = ("shape", "color", "size", "position", "texture")


def _largest(record: dict) -> dict:
    return max(record["objects"], key=lambda o: o["area"])


@torch.no_grad()
def _embed(model, transform, records: list[dict], root: Path, batch: int = 128) -> np.ndarray:
    chunks = []
    for start in range(0, len(records), batch):
        images = torch.stack([transform(load_image(str(root / r["image"]))) for r in records[start : start + batch]])
        chunks.append(model.encode_image(images)[0])
    return torch.cat(chunks).numpy()


def probe(train_x: np.ndarray, train: list[dict], test_x: np.ndarray, test: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for attribute in ATTRIBUTES:
        y_train = [_largest(r)[attribute] for r in train]
        y_test = [_largest(r)[attribute] for r in test]
        fit = LogisticRegression(C=10, max_iter=2000).fit(train_x, y_train)
        majority = Counter(y_train).most_common(1)[0][0]
        out[attribute] = {
            "accuracy": 100 * fit.score(test_x, y_test),
            "majority": 100 * float(np.mean([y == majority for y in y_test])),
        }
    shapes = sorted({o["shape"] for r in train for o in r["objects"]})
    scores = []
    for shape in shapes:
        y_train = [any(o["shape"] == shape for o in r["objects"]) for r in train]
        y_test = [any(o["shape"] == shape for o in r["objects"]) for r in test]
        fit = LogisticRegression(C=10, max_iter=2000, class_weight="balanced").fit(train_x, y_train)
        scores.append(balanced_accuracy_score(y_test, fit.predict(test_x)))
    out["shape_present"] = {"accuracy": 100 * float(np.mean(scores)), "majority": 50.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dreamlip demo-data directory")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--max-train", type=int, default=2000)
    parser.add_argument("--out", help="write the probes as JSON here")
    args = parser.parse_args()
    root = Path(args.data)
    # the generator's own records: "objects" holds the scene, which the training schema does not read
    train = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()][: args.max_train]
    test = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    results = {}
    for item in args.checkpoints:
        name, _, path = item.partition("=")
        loaded = load_model(path)
        model, transform = loaded.model, loaded.eval_transform
        results[name] = probe(_embed(model, transform, train, root), train, _embed(model, transform, test, root), test)
    print(f"{'attribute':15s}" + "".join(f"{name:>12s}" for name in results) + f"{'majority':>10s}")
    for attribute in (*ATTRIBUTES, "shape_present"):
        cells = "".join(f"{results[name][attribute]['accuracy']:12.1f}" for name in results)
        print(f"{attribute:15s}{cells}{next(iter(results.values()))[attribute]['majority']:10.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
