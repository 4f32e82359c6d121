"""``dreamlip eval``: evaluate a checkpoint (or an open_clip model) on one dataset, write JSON.

    dreamlip eval --checkpoint CKPT --data DEMO_DIR --out results.json
    dreamlip eval --model ViT-B-16 --pretrained openai.bin --data coco/dataset_coco.json \
        --images coco/ --tasks retrieval --long-text sentences --out coco.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dreamlip.eval import DEMO_TASKS

    model = parser.add_argument_group("model (one of)")
    source = model.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a dreamlip checkpoint, or a directory from dreamlip export")
    source.add_argument("--model", help="an open_clip architecture name (a baseline)")
    model.add_argument("--pretrained", help="with --model: an open_clip weights file")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        help="the dataset: a demo-data directory, JSONL, image folder, "
        "shards (.tar dir or pattern), Karpathy JSON, {image, caption} JSON/JSONL, or VOC-style folder",
    )
    data.add_argument(
        "--tasks",
        default=",".join(DEMO_TASKS),
        help="comma-separated: zeroshot, retrieval, long_retrieval, segmentation, linear_probe "
        "(default: all but long_retrieval)",
    )
    data.add_argument("--classes", help="classes file (.txt one per line, .json) or 'imagenet'")
    data.add_argument(
        "--templates",
        help="prompt templates: 'imagenet' (CLIP's 80), 'imagenet-simple', or a "
        "file (.txt one per line with {} or {c}; .json list or {class: [prompts]}); "
        "default: the classes file's, else 'imagenet'",
    )
    data.add_argument("--split", default="test", help="evaluation split (default test)")
    data.add_argument(
        "--images", help="image root for Karpathy and {image, caption} files (default: the file's dir)"
    )
    data.add_argument("--train-data", help="linear probe training set (default: the dataset's train split)")

    options = parser.add_argument_group("task options")
    options.add_argument(
        "--long-text",
        choices=("truncate", "full", "sentences"),
        default="truncate",
        help="retrieval texts: cut at CLIP's 77 tokens (default truncate), encode up to the model's "
        "context (full: 248 for a long-context model), or average the sentences' embeddings of those "
        "over the model's context (sentences)",
    )
    options.add_argument(
        "--seg-threshold",
        type=float,
        help="background by threshold: pixels whose top "
        "foreground probability is below it become background (default: background is "
        "scored by its own prompt)",
    )
    options.add_argument(
        "--seg-calibrate",
        metavar="SPLIT",
        help="also score background by a threshold chosen on this other split's masks (e.g. train): "
        "the calibrated/<metric> keys and calibrated/threshold",
    )
    options.add_argument(
        "--seg-calibrate-images", type=int, default=100, help="calibrate on that split's first N images (default 100)"
    )
    options.add_argument("--seg-background", default="background", help="name of the background class")
    options.add_argument(
        "--seg-stride", type=int, help="sliding-window stride in pixels (default: half the input size)"
    )
    options.add_argument(
        "--seg-short-side",
        type=int,
        help="resize images to this short side first (default: keep, but at least the input size)",
    )
    options.add_argument(
        "--seg-dense",
        default="raw",
        help="patch read-out(s), comma-separated: raw (default: the last block as trained), maskclip, "
        "sclip, clearclip, naclip; several are scored from one encode: the first's metrics keep their "
        "keys, the others' are keyed <read-out>/<metric>",
    )
    options.add_argument(
        "--seg-pamr", action="store_true", help="refine score maps with PAMR (10 iterations, dilations 8, 16)"
    )
    options.add_argument(
        "--seg-benchmark",
        help="read --data as a standard segmentation set from the layout it ships in: voc21, voc20, "
        "context60, context59, coco_object, coco_stuff, ade20k, cityscapes (docs/eval.md)",
    )
    options.add_argument(
        "--seg-preset",
        choices=("standard",),
        help="the training-free segmentation suite's settings for --seg-benchmark (short side, "
        "80 templates, background threshold); flags given explicitly win",
    )
    options.add_argument(
        "--conditioned",
        choices=("auto", "all", "topk", "off"),
        default="auto",
        help="also score zero-shot and retrieval by text-conditioned image embeddings (a checkpoint whose "
        "objective has FLAIR's pooler), keyed conditioned_<metric>: retrieval over all pairs or by "
        "re-ranking the global top --conditioned-k; auto (default): topk when the pooler is there, else off",
    )
    options.add_argument(
        "--conditioned-k", type=int, default=128, help="texts per image and images per text re-ranked (default 128, FLAIR's)"
    )
    options.add_argument(
        "--pool-chunk",
        type=int,
        default=16384,
        help="query and patch tokens per pooler call: bounds its memory (default 16384)",
    )
    options.add_argument(
        "--probe-c", type=float, help="linear probe L2 strength C (default: chosen on a validation split)"
    )
    options.add_argument("--probe-max-train", type=int, help="linear probe: use the first N training images")

    run_opts = parser.add_argument_group("run")
    run_opts.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    run_opts.add_argument("--batch-size", type=int, default=64)
    run_opts.add_argument("--workers", type=int, default=2, help="image decoding processes (default 2)")
    run_opts.add_argument("--out", help="write results JSON here (default: stdout only)")
    run_opts.add_argument("--quiet", action="store_true", help="no progress bars")


def _task_options(args: argparse.Namespace) -> dict:
    """Options for the tasks selected; a flag only some task uses goes to that task only."""
    wanted = set(args.tasks.split(","))
    options = {"split": args.split}
    for key, value in (("classes", args.classes), ("templates", args.templates)):
        if value is not None:
            options[key] = value
    if args.images is not None:
        options["images"] = args.images
    if "segmentation" in wanted:
        options.update(
            background=args.seg_background,
            threshold=args.seg_threshold,
            calibrate=args.seg_calibrate,
            calibrate_images=args.seg_calibrate_images,
            stride=args.seg_stride,
            short_side=args.seg_short_side,
            dense=args.seg_dense,
            pamr=args.seg_pamr,
            benchmark=args.seg_benchmark,
            preset=args.seg_preset,
        )
    if "linear_probe" in wanted:
        options.update(train=args.train_data, C=args.probe_c, max_train=args.probe_max_train)
    return options


def _load(args: argparse.Namespace):
    """The model to evaluate (``dreamlip.loading.LoadedModel``): a checkpoint or export, open_clip
    weights, or a bare architecture."""
    from dreamlip.loading import load_model

    return load_model(args.checkpoint or args.pretrained, model_name=args.model, device=args.device)


class ConditioningRefused(ValueError):
    """``--conditioned`` asked of a model without a pooler, or with a k or chunk below 1."""


def _conditioning(args: argparse.Namespace, loaded):
    """The text-conditioned scoring ``--conditioned`` asks for (None: off), from the loaded
    objective's pooler."""
    from dreamlip.eval import Conditioning

    pooler = loaded.objective.conditioned_pooler if loaded.objective is not None else None
    if args.conditioned == "off" or (args.conditioned == "auto" and pooler is None):
        return None
    if pooler is None:
        raise ConditioningRefused(
            f"--conditioned {args.conditioned}: the model has no text-conditioned pooler (a checkpoint trained "
            "with loss.objective=flair has; an export or open_clip weights have none)"
        )
    try:
        return Conditioning(pooler, "topk" if args.conditioned == "auto" else args.conditioned, args.conditioned_k, args.pool_chunk)
    except ValueError as err:
        raise ConditioningRefused(str(err)) from None


def run(args: argparse.Namespace) -> int:
    from dreamlip.checkpoint import NotADreamLIPCheckpoint
    from dreamlip.eval import EvalDataError, build_tasks, evaluate
    from dreamlip.loading import PretrainedMismatch

    if args.pretrained and not args.model:
        print("dreamlip eval: error: --pretrained goes with --model", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        tasks = build_tasks(args.data, args.tasks.split(","), long_text=args.long_text, **_task_options(args))
    except ValueError as err:  # an unknown task, or a flag none of the chosen tasks uses
        print(f"dreamlip eval: error: {err}", file=sys.stderr)
        return 2
    try:
        for task in tasks:
            task.describe()  # reads the data: bad input fails before the model loads
        loaded = _load(args)
        conditioning = _conditioning(args, loaded)
        metrics = evaluate(
            loaded.model,
            loaded.tokenizer,
            loaded.eval_transform,
            tasks,
            args.device,
            batch_size=args.batch_size,
            workers=args.workers,
            progress=not args.quiet,
            conditioning=conditioning,
        )
    except (EvalDataError, NotADreamLIPCheckpoint, PretrainedMismatch, FileNotFoundError, ConditioningRefused) as err:
        print(f"dreamlip eval: error: {err}", file=sys.stderr)
        return 2
    results = {
        "model": loaded.info,
        "data": str(args.data),
        "tasks": [task.describe() for task in tasks],  # again: now with what the run found (the context)
        # what the conditioned_<metric> keys are: None when there are none
        "conditioned": {"mode": conditioning.mode, "k": conditioning.k} if conditioning else None,
        "metrics": metrics,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    width = max(map(len, metrics))
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:8.2f}")
    return 0
