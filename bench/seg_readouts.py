"""Segmentation read-outs: speed against ``raw`` in one run, and mIoU of trained checkpoints.

Speed (default): one model (random weights: speed does not depend on them), the same images, each
read-out's segmenter (``dreamlip.eval.Segmenter``) timed in rounds that run every read-out back to
back, so machine noise hits all alike; prints images/s per read-out and, as the ratio to ``raw``,
the median over rounds of each round's ratio. ``all`` times every read-out from one shared encode.

    python bench/seg_readouts.py                                   # tiny demo model, CPU
    python bench/seg_readouts.py --model ViT-B-16 --size 448 --device cuda --rounds 10
    python bench/seg_readouts.py --pamr                            # with PAMR after each read-out

Quality (``--checkpoints``): evaluate trained checkpoints on a dataset with every read-out from one
encode per image, and print mIoU per read-out, mean ± std over the checkpoints of each group
(``--checkpoints NAME=CKPT ...``, one entry per seed; the same NAME pools the seeds), e.g. the
ablation's CLIP and DreamLIP rungs:

    python bench/seg_readouts.py --data ablation-out/data \\
        --checkpoints clip=ablation-out/runs/clip/seed{0,1,2}/model.pt \\
                      dreamlip=ablation-out/runs/dreamlip/seed{0,1,2}/model.pt --out seg-readouts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamlip.eval import SegmentationTask, Segmenter, evaluate
from dreamlip.eval.dense import DENSE_READOUTS
from dreamlip.model import create_model, get_tokenizer


def speed(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model, _, transform = create_model(args.model, device=args.device)
    model.eval()
    tokenizer = get_tokenizer(args.model)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (args.size, args.size * 4 // 3, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    classes = [f"class {i}" for i in range(args.classes)]
    variants = {r: [r] for r in DENSE_READOUTS} | {"all": list(DENSE_READOUTS)}
    segmenters = {
        name: Segmenter(model, tokenizer, transform, classes, ["a photo of a {}."], dense=readouts,
                        pamr=args.pamr, device=args.device, batch_size=args.batch_size)  # fmt: skip
        for name, readouts in variants.items()
    }
    for segmenter in segmenters.values():  # warm-up
        segmenter.label_maps(images[0])
    seconds: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        for name, segmenter in segmenters.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            for image in images:
                segmenter.label_maps(image)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    window = segmenters["raw"].window
    print(f"{args.model}, {args.images} images {args.size * 4 // 3}x{args.size}, windows {window}, "
          f"{args.classes} classes, {args.device}, PAMR {'on' if args.pamr else 'off'}, {args.rounds} rounds")  # fmt: skip
    print(f"{'read-out':10s} {'images/s':>9s} {'time vs raw':>12s}")
    results = {}
    for name, times in seconds.items():
        ratio = statistics.median(t / r for t, r in zip(times, seconds["raw"], strict=True))
        rate = args.images / statistics.median(times)
        results[name] = {"images_per_s": rate, "time_ratio_to_raw": ratio}
        print(f"{name:10s} {rate:9.2f} {ratio:11.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "speed": results}, indent=2) + "\n")


def quality(args: argparse.Namespace) -> None:
    from dreamlip.loading import load_model

    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for entry in args.checkpoints:
        name, _, path = entry.partition("=")
        if not path:
            raise SystemExit(f"--checkpoints entries are NAME=CKPT, got {entry!r}")
        loaded = load_model(path, device=args.device)
        model, transform, tokenizer = loaded.model, loaded.eval_transform, loaded.tokenizer
        task = SegmentationTask(args.data, dense=list(DENSE_READOUTS), pamr=args.pamr)
        metrics = evaluate(model, tokenizer, transform, task, device=args.device, progress=False)
        groups[name].append(metrics)
        print(f"{name} {path}: " + ", ".join(f"{r} {_miou(metrics, r):.1f}" for r in DENSE_READOUTS), flush=True)
    print(f"\nmIoU per read-out on {args.data}{' with PAMR' if args.pamr else ''}, mean ± std over checkpoints")
    print(f"{'model':12s}" + "".join(f"{r:>14s}" for r in DENSE_READOUTS))
    table = {}
    for name, runs in groups.items():
        table[name] = {}
        cells = []
        for readout in DENSE_READOUTS:
            values = [_miou(m, readout) for m in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            table[name][readout] = {"mean": statistics.mean(values), "std": spread, "values": values}
            cells.append(f"{statistics.mean(values):7.1f} ± {spread:4.1f}")
        print(f"{name:12s}" + "".join(f"{c:>14s}" for c in cells))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "mIoU": table}, indent=2) + "\n")


def _miou(metrics: dict[str, float], readout: str) -> float:
    # the first read-out (raw) keeps the plain keys, the others are prefixed
    return metrics["segmentation/mIoU" if readout == DENSE_READOUTS[0] else f"segmentation/{readout}/mIoU"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DreamLIP-ViT-Tiny-64", help="speed: an open_clip architecture")
    parser.add_argument("--size", type=int, default=96, help="speed: image height (width 4/3 of it)")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--pamr", action="store_true")
    parser.add_argument("--data", help="quality: the dataset (e.g. a demo-data directory)")
    parser.add_argument("--checkpoints", nargs="+", metavar="NAME=CKPT", help="quality: checkpoints to evaluate")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    if args.checkpoints:
        if not args.data:
            parser.error("--checkpoints needs --data")
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
