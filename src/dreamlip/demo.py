"""``dreamlip demo``: the whole story on one machine in minutes.

Generate the embedded dataset (or, with ``dataset="real"``, the real-image development set),
train plain CLIP and DreamLIP (or the training variants ``models`` names) with the same model,
steps and seed, evaluate each on the held-out split (zero-shot classification, retrieval both
ways, long-text retrieval, segmentation with every dense read-out, linear probe) beside
no-knowledge baselines, and write ``results.json`` and ``report.html`` (learning curves of the
held-out metrics, grouping heatmaps, segmentation maps, phase times). See docs/demo.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from dreamlip.captions import split_sentences
from dreamlip.config import ABLATION_VARIANTS, load_config
from dreamlip.formats import demo_split_file
from dreamlip.synthetic import generator
from dreamlip.losses import group_patches
from dreamlip.io import atomic_write
from dreamlip.report import eval_curve_figure, grouping_figure, heatmap_grid, loss_figure, segmentation_figure, write_report

__all__ = ["DemoSettings", "run_demo"]


@dataclass
class DemoSettings:
    """Defaults sized for 2 CPU cores: under 10 minutes end to end (README, "What the demo shows")."""

    # "synthetic": the embedded set (docs/demo-data.md); "real": the real-image development set
    # (docs/real-data.md), same sizes and layout
    dataset: Literal["synthetic", "real"] = "synthetic"
    n_train: int = 3000
    n_test: int = 300
    steps: int = 400
    batch_size: int = 64
    k: int = 6
    # "whole": each long caption one positive (the embedded set's fit the 77-token context), better
    # on long retrieval and about 1.8x DreamLIP's training time at k=6; "sentences+whole": both in
    # the pool, long retrieval nearly doubled at about 1.4x (docs/results.md).
    long_mode: Literal["sentences", "whole", "sentences+whole"] = "sentences"
    seed: int = 0
    heatmap_images: int = 3
    eval_every: int | None = None  # held-out eval during training every N steps; None: a third of the steps, 0: off
    # Training processes (gloo), the cores shared out, each taking batch_size / ranks of the same
    # global batch; the cross-image grouping negatives are gathered, so the loss is one process's.
    ranks: int = 1
    # The training variants to train and compare (config.ABLATION_VARIANTS), in the report's order;
    # the first is the one the others' differences are taken against.
    models: list[str] = field(default_factory=lambda: ["clip", "dreamlip"])


def _seg_readouts() -> str:
    """Every dense read-out, for the final evaluation: one shared trunk, five last blocks."""
    from dreamlip.eval.dense import DENSE_READOUTS

    return ",".join(DENSE_READOUTS)


@contextmanager
def _phase(timings: dict[str, float], key: str, message: str):
    """Announce a phase, then print and record (``timings[key]``) how long it took."""
    print(f"\n== {message}", flush=True)
    started = time.perf_counter()
    yield
    timings[key] = time.perf_counter() - started
    print(f"   {key}: {timings[key]:.1f} s", flush=True)


def _eval_every(settings: DemoSettings) -> int:
    # rounded up: 400 // 3 = 133 would evaluate at step 399 and again at the final step 400
    return max(1, math.ceil(settings.steps / 3)) if settings.eval_every is None else settings.eval_every


def _check_settings(settings: DemoSettings) -> None:
    if settings.ranks < 1 or settings.batch_size % settings.ranks:
        raise ValueError(f"ranks must be at least 1 and divide the batch size {settings.batch_size}, got {settings.ranks}")
    unknown = [name for name in settings.models if name not in ABLATION_VARIANTS]
    if unknown or not settings.models:
        what = f"unknown model(s) {', '.join(unknown)}" if unknown else "no models given"
        raise ValueError(f"{what}; choose from {', '.join(ABLATION_VARIANTS)}")
    if len(set(settings.models)) != len(settings.models):
        raise ValueError(f"models: each at most once, got {','.join(settings.models)}")


def _train_run(variant: str, data_dir: Path, run_dir: Path, settings: DemoSettings) -> dict[str, Any]:
    from dreamlip.eval import TRAIN_EVAL_TASKS
    from dreamlip.train import train

    run_fields = {
        "data.train": str(demo_split_file(data_dir, "train")),
        "optim.max_steps": settings.steps,
        "optim.batch_size": settings.batch_size // settings.ranks,
        "captions.k": settings.k,
        "run.seed": settings.seed,
        "run.save_every": settings.steps,
        # learning curves of the held-out metrics: the test split, the tasks that fit no classifier
        "run.eval_every": _eval_every(settings),
        "run.eval_data": str(data_dir),
        "run.eval_tasks": list(TRAIN_EVAL_TASKS),
    }
    if settings.ranks > 1:
        run_fields["run.device"] = "cpu"
        if ABLATION_VARIANTS[variant]["loss.objective"] == "dreamlip":
            # each rank scores its own rows of the gathered batch: the one-process loss at 1/ranks the
            # work (the other objectives gather the texts themselves and read neither field)
            run_fields |= {"loss.group_gather": True, "loss.local_loss": True}
    # The variant's captions.k=0 wins over run_fields for clip; the long-caption mode is over the variant's.
    config = load_config("demo", run_fields, [f"captions.long_mode={settings.long_mode}"], variant=variant)
    if settings.ranks == 1:
        return train(config, run_dir)
    return _train_on_ranks(config, run_dir, settings.ranks)


def _train_on_ranks(config, run_dir: Path, ranks: int) -> dict[str, Any]:
    """``train`` in ``ranks`` spawned gloo processes; returns the main rank's summary."""
    import torch.multiprocessing as mp

    run_dir.mkdir(parents=True, exist_ok=True)
    rendezvous = run_dir.resolve() / ".rendezvous"  # file:// takes an absolute path
    rendezvous.unlink(missing_ok=True)  # a killed run's file would make the new ranks wait for ghosts
    threads = max(1, torch.get_num_threads() // ranks)
    mp.start_processes(_rank_main, args=(ranks, str(rendezvous), threads, config, str(run_dir)), nprocs=ranks, start_method="spawn")
    rendezvous.unlink(missing_ok=True)
    return json.loads((run_dir / "summary.json").read_text())


def _rank_main(rank: int, ranks: int, rendezvous: str, threads: int, config, run_dir: str) -> None:
    import torch.distributed as dist

    from dreamlip.distributed import exit_spawned_rank
    from dreamlip.train import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks))  # what init_distributed reads
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=ranks)
    train(config, run_dir)  # which tears the process group down
    exit_spawned_rank()


def _read_curves(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """metrics.jsonl split into training-step records and train-time eval records."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_seconds" in r]
    return [r for r in rows if "loss" in r], evals


def _test_records(data_dir: Path, count: int) -> list[dict[str, Any]]:
    return [json.loads(line) for line in demo_split_file(data_dir, "test").read_text().splitlines()[:count]]


def _heatmap_rows(models: dict[str, Any], transform, tokenizer, data_dir: Path, count: int) -> list[dict[str, Any]]:
    """Patch weights of each long-caption sentence of a few test images, for every model."""
    rows = []
    for record in _test_records(data_dir, count):
        image = Image.open(data_dir / record["image"]).convert("RGB")
        first_captioner = next(iter(record["captions"].values()))
        sentences = split_sentences(first_captioner["long"])[:4]
        for name, model in models.items():
            with torch.no_grad():
                _, patches = model.encode_image(transform(image)[None], with_patches=True)
                texts = model.encode_text(tokenizer(sentences))[None]
                _, weights = group_patches(texts, patches)
            grid = model.clip.visual.grid_size
            rows.append(
                {
                    "image": np.asarray(image),
                    "title": f"{name}: {record['id']}",
                    "texts": sentences,
                    "weights": [heatmap_grid(w.numpy(), grid) for w in weights[0]],
                }
            )
    return rows


def _segmentation_rows(models, transform, tokenizer, task, data_dir: Path, count: int, best: dict[str, str]):
    """Ground truth and each model's zero-shot label maps (raw and its best dense read-out) of a
    few test images, computed as the segmentation task computes them."""
    from dreamlip.eval.datasets import load_mask
    from dreamlip.eval.encode import EvalContext

    data = task.dataset
    segmenters = {}
    for name, model in models.items():
        model.eval()
        segmenters[name] = task.segmenter(EvalContext(model, tokenizer, transform, torch.device("cpu"), progress=False))
    rows = []
    for record in _test_records(data_dir, count):
        image = Image.open(data_dir / record["image"]).convert("RGB")
        panels = [("ground truth", load_mask(str(data_dir / record["mask"]), len(data.classnames), data.ignore_index))]
        for name, segmenter in segmenters.items():
            with torch.no_grad():
                maps = segmenter.label_maps(image)
            panels += [(f"{name}: {readout}", maps[readout]) for readout in dict.fromkeys(("raw", best[name]))]
        rows.append({"image": np.asarray(image), "title": record["id"], "panels": panels})
    return rows, data.classnames, data.ignore_index


def _best_dense(metrics: dict[str, float]) -> dict[str, Any]:
    """The dense read-out (not raw) with the highest mIoU, and the one with the highest mIoU when
    background is told by the calibrated threshold; chosen on the test split itself, so an upper
    bound of what picking one read-out in advance would give."""
    dense = [r for r in _seg_readouts().split(",") if r != "raw"]
    scores = {r: metrics[f"segmentation/{r}/mIoU"] for r in dense}
    readout = max(scores, key=scores.get)
    calibrated = {r: metrics[f"segmentation/{r}/calibrated/mIoU"] for r in dense}
    best_calibrated = max(calibrated, key=calibrated.get)
    return {
        "raw_mIoU": metrics["segmentation/mIoU"],
        "best_dense": readout,
        "best_dense_mIoU": scores[readout],
        "best_dense_pixel_acc": metrics[f"segmentation/{readout}/pixel_acc"],
        "best_dense_objects_mIoU": metrics[f"segmentation/{readout}/objects/mIoU"],
        "best_dense_calibrated": best_calibrated,
        "best_dense_calibrated_mIoU": calibrated[best_calibrated],
        "best_dense_calibrated_threshold": metrics[f"segmentation/{best_calibrated}/calibrated/threshold"],
    }


def _baselines(tasks) -> dict[str, dict[str, Any]]:
    """What a model with no knowledge scores: the segmentation task's constant predictions
    (:meth:`SegmentationTask.constant_baselines`), 1/classes for classification."""
    from dreamlip.eval import SegmentationTask, ZeroShotTask

    segmentation = next(t for t in tasks if isinstance(t, SegmentationTask)).constant_baselines()
    chance = 100.0 / len(next(t for t in tasks if isinstance(t, ZeroShotTask)).dataset.classnames)
    return segmentation | {"chance": {"zeroshot/top1": chance, "linear_probe/top1": chance}}


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None) -> dict[str, Any]:
    from dreamlip.loading import load_model
    from dreamlip.eval import TASK_NAMES, build_tasks, evaluate

    readouts = _seg_readouts()
    settings = settings or DemoSettings()
    _check_settings(settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    data_dir = out_dir / "data"
    with _phase(timings, "data_s", f"1/4 rendering {settings.n_train} + {settings.n_test} {settings.dataset} images into {data_dir}"):
        generator(settings.dataset)(data_dir, n_train=settings.n_train, n_test=settings.n_test, seed=settings.seed, progress=True)

    summaries, losses, evals = {}, {}, {}
    for index, variant in enumerate(settings.models, start=1):
        every = _eval_every(settings)
        message = f"2/4 training {variant} ({index}/{len(settings.models)}): {settings.steps} steps of {settings.batch_size}"
        with _phase(timings, f"train_{variant}_s", message + (f", held-out eval every {every}" if every else "")):
            summaries[variant] = _train_run(variant, data_dir, out_dir / "runs" / variant, settings)
        losses[variant], evals[variant] = _read_curves(out_dir / "runs" / variant)
        # included in train_<variant>_s: the train-time evaluations' share of it
        timings[f"train_eval_{variant}_s"] = sum(r["eval_seconds"] for r in evals[variant])
        print(f"   train_eval_{variant}_s: {timings[f'train_eval_{variant}_s']:.1f} s ({len(evals[variant])} evaluations, part of train_{variant}_s)")

    metrics, models = {}, {}
    with _phase(timings, "eval_s", f"3/4 evaluating {_count(settings.models)} on the held-out split (segmentation read-outs {readouts})"):
        # background also by a threshold chosen on training masks (never the test ones)
        tasks = build_tasks(data_dir, TASK_NAMES, dense=readouts, calibrate="train")
        for variant in settings.models:
            loaded = load_model(out_dir / "runs" / variant / "model.pt")
            model, transform, tokenizer = loaded.model, loaded.eval_transform, loaded.tokenizer
            models[variant] = model
            metrics[variant] = evaluate(model, tokenizer, transform, tasks, device="cpu")
        baselines = _baselines(tasks)

    with _phase(timings, "report_s", "4/4 writing results.json and report.html"):
        segmentation = {variant: _best_dense(m) for variant, m in metrics.items()}
        seg_task = next(t for t in tasks if t.name == "segmentation")
        results = {
            "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "heatmap_images"}
            | {"eval_every": _eval_every(settings), "seg_readouts": readouts,
               "seg_calibrate": {"split": seg_task.calibrate, "images": min(seg_task.calibrate_images, settings.n_train)}},
            "models": metrics,
            "segmentation": segmentation,
            "baselines": baselines,
            "training": {v: {"steps": s["steps"], "final_loss": s["final"].get("loss"), "skipped": s["skipped"]} for v, s in summaries.items()},
            "timings": timings,
        }
        best = {variant: s["best_dense"] for variant, s in segmentation.items()}
        figures = {
            "loss": loss_figure(losses),
            "eval": eval_curve_figure(evals, baselines),
            "grouping": grouping_figure(_heatmap_rows(models, transform, tokenizer, data_dir, settings.heatmap_images)),
            "segmentation": segmentation_figure(
                *_segmentation_rows(models, transform, tokenizer, seg_task, data_dir, settings.heatmap_images, best)
            ),
        }
        write_report(out_dir / "report.html", results, figures)
    timings["total_s"] = time.perf_counter() - started
    atomic_write(out_dir / "results.json", lambda f: f.write(json.dumps(results, indent=2)))
    _print_table(metrics, segmentation, baselines)
    _print_timings(timings)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'report.html'} in {timings['total_s']:.0f} s")
    _print_serve_hint(settings.models, out_dir / "runs", data_dir)
    return results


def _count(models: list[str]) -> str:
    return {1: "the model", 2: "both models"}.get(len(models), f"the {len(models)} models")


def _print_serve_hint(models: list[str], runs: Path, data_dir: Path) -> None:
    """How to browse the last model beside the first (`dreamlip serve` compares two checkpoints)."""
    first, last = models[0], models[-1]
    if first == last:
        print(f"browse the model: dreamlip serve --checkpoint {runs / last / 'model.pt'} --images {data_dir}")
        return
    what = "both models" if len(models) == 2 else f"{last} beside {first}"
    print(f"browse {what}: dreamlip serve --checkpoint {runs / last / 'model.pt'} --compare {runs / first / 'model.pt'} --images {data_dir}")


def _print_table(metrics: dict[str, dict[str, float]], segmentation: dict[str, dict[str, Any]], baselines) -> None:
    from dreamlip.report import HEADLINE_METRICS, baseline_of

    widths = {name: max(8, len(name) + 1) for name in metrics}
    print(f"\n{'metric':36s} " + "".join(f"{name:>{width}s} " for name, width in widths.items()) + f"{'baseline':>9s}")
    for key in HEADLINE_METRICS:
        if all(key in m for m in metrics.values()):
            reference = baseline_of(baselines, key)
            cell = f"{reference:9.2f}" if reference is not None else f"{'':9s}"
            print(f"{key:36s} " + "".join(f"{metrics[name][key]:{width}.2f} " for name, width in widths.items()) + cell)
    row = "  ".join(f"{name} {s['best_dense_mIoU']:.2f} ({s['best_dense']})" for name, s in segmentation.items())
    print(f"{'segmentation/mIoU, best dense':36s} {row}")
    row = "  ".join(f"{name} {s['best_dense_objects_mIoU']:.2f}" for name, s in segmentation.items())
    print(f"{'segmentation/objects/mIoU, same':36s} {row}")
    row = "  ".join(
        f"{name} {s['best_dense_calibrated_mIoU']:.2f} ({s['best_dense_calibrated']}, t {s['best_dense_calibrated_threshold']:.2f})"
        for name, s in segmentation.items()
    )
    print(f"{'segmentation/calibrated/mIoU, best':36s} {row}")
    commonest = baselines["commonest_shape_everywhere"]
    print("baselines: background everywhere mIoU {segmentation/mIoU:.2f}, pixel accuracy {segmentation/pixel_acc:.2f}; "
          "chance top-1 {chance:.2f}".format(**baselines["background_everywhere"], chance=baselines["chance"]["zeroshot/top1"]))
    print(f"objects only (background pixels left out): the commonest shape ({commonest['shape']}) everywhere "
          f"mIoU {commonest['segmentation/objects/mIoU']:.2f}")


def _print_timings(timings: dict[str, float]) -> None:
    print(f"\n{'phase':24s} {'seconds':>8s}")
    for key, seconds in timings.items():
        print(f"{key.removesuffix('_s'):24s} {seconds:8.1f}")
