"""Where a checkpoint's zero-shot errors fall on a demo dataset's test split (embedded or real).

Zero-shot top-1 over the test images, split by how many objects the image shows, by the labelled
(largest) object's size, and, for the wrong answers, the share that names another object present
in the image (a multi-object confusion) rather than one that is absent (a recognition error).
Each checkpoint is scored exactly as ``dreamlip eval`` scores zero-shot (its class names, templates
and global image embeddings), so its "all" equals the run's ``zeroshot/top1``.

    python bench/zeroshot_breakdown.py --data ablation-real/data \\
        --checkpoints short=ablation-real/runs/short/seed0/model.pt dreamlip=ablation-real/runs/dreamlip/seed0/model.pt \\
        --out zeroshot-breakdown.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from dreamlip.eval.datasets import read_classification
from dreamlip.eval.encode import EvalContext, encode_images
from dreamlip.eval.zeroshot import class_embeddings, resolve_templates
from dreamlip.io import atomic_write
from dreamlip.loading import load_model


def breakdown(predictions: list[int], labels: list[int], records: list[dict], classes: list[str]) -> dict[str, dict[str, float]]:
    """``{group: {"top1": %, "n": count}}`` for ``all``, ``objects=N``, ``size=S`` and, over the
    errors, ``wrong: names an object present`` (its "top1" is that share, in %)."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for predicted, label, record in zip(predictions, labels, records, strict=True):
        named = [(classes.index(o["category"] if "category" in o else o["shape"]), o) for o in record["objects"]]
        present = {index for index, _ in named}
        labelled = next(o for index, o in named if index == label)
        correct = predicted == label
        for group in ("all", f"objects={len(record['objects'])}", f"size={labelled['size']}"):
            hits[group].append(correct)
        if not correct:
            hits["wrong: names an object present"].append(predicted in present)
    return {group: {"top1": 100 * sum(values) / len(values), "n": float(len(values))} for group, values in sorted(hits.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a demo directory (dreamlip demo-data [--kind real])")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="NAME=PATH")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    data = Path(args.data)
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    classification = read_classification(data, split="test")
    if len(records) != len(classification.labels):
        raise SystemExit(f"{data}: {len(records)} test records but {len(classification.labels)} labelled images")
    results = {}
    for item in args.checkpoints:
        name, _, path = item.partition("=")
        loaded = load_model(path)
        ctx = EvalContext(loaded.model, loaded.tokenizer, loaded.eval_transform, torch.device("cpu"), progress=False)
        weights = class_embeddings(ctx, classification.classnames, resolve_templates(None, classification.templates))
        predictions = (encode_images(ctx, classification.images, desc=name) @ weights.T).argmax(1).tolist()
        results[name] = breakdown(predictions, list(classification.labels), records, list(classification.classnames))
        print(f"{name}: " + ", ".join(f"{group} {cell['top1']:.1f} (n={cell['n']:.0f})" for group, cell in results[name].items()), flush=True)
    atomic_write(args.out, lambda handle: json.dump(results, handle, indent=2))


if __name__ == "__main__":
    main()
