"""``dreamlip demo``: the whole story on one machine in minutes.

Generate the embedded dataset, train plain CLIP and DreamLIP with the same model, steps and seed,
evaluate both on the held-out split (zero-shot classification, retrieval both ways, long-text
retrieval, segmentation, linear probe), and write ``results.json`` and ``report.html``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamlip.captions import split_sentences
from dreamlip.config import load_config
from dreamlip.data.synthetic import generate
from dreamlip.losses import group_patches
from dreamlip.report import grouping_figure, heatmap_grid, loss_figure, write_report

__all__ = ["DemoSettings", "run_demo"]

RUNS = ("clip", "dreamlip")


@dataclass
class DemoSettings:
    """Defaults sized for 2 CPU cores: 10 to 15 minutes end to end."""

    n_train: int = 3000
    n_test: int = 300
    steps: int = 600
    batch_size: int = 64
    k: int = 6
    seed: int = 0
    heatmap_images: int = 3


def _stage(message: str) -> None:
    print(f"\n== {message}", flush=True)


def _train_run(variant: str, data_dir: Path, run_dir: Path, settings: DemoSettings) -> dict[str, Any]:
    from dreamlip.train import train

    run_fields = {
        "data.train": str(data_dir / "train.jsonl"),
        "optim.max_steps": settings.steps,
        "optim.batch_size": settings.batch_size,
        "captions.k": settings.k,
        "run.seed": settings.seed,
        "run.save_every": settings.steps,
    }
    config = load_config("demo", run_fields, variant=variant)  # the variant's captions.k=0 wins for clip
    started = time.perf_counter()
    summary = train(config, run_dir)
    summary["seconds"] = time.perf_counter() - started
    return summary


def _heatmap_rows(models: dict[str, Any], transform, tokenizer, data_dir: Path, count: int) -> list[dict[str, Any]]:
    """Patch weights of each long-caption sentence of a few test images, for every model."""
    records = [json.loads(line) for line in (data_dir / "test.jsonl").read_text().splitlines()[:count]]
    rows = []
    for record in records:
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


def run_demo(out_dir: str | Path, settings: DemoSettings | None = None) -> dict[str, Any]:
    from dreamlip.checkpoint import load_model
    from dreamlip.eval import TASK_NAMES, build_tasks, evaluate

    settings = settings or DemoSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    data_dir = out_dir / "data"
    _stage(f"1/4 rendering {settings.n_train} + {settings.n_test} synthetic images into {data_dir}")
    generate(data_dir, n_train=settings.n_train, n_test=settings.n_test, seed=settings.seed, progress=True)
    timings["data_s"] = time.perf_counter() - started

    summaries = {}
    for index, variant in enumerate(RUNS, start=1):
        _stage(f"2/4 training {variant} ({index}/{len(RUNS)}): {settings.steps} steps of {settings.batch_size}")
        summaries[variant] = _train_run(variant, data_dir, out_dir / "runs" / variant, settings)
        timings[f"train_{variant}_s"] = summaries[variant]["seconds"]

    _stage("3/4 evaluating both models on the held-out split")
    tasks = build_tasks(data_dir, TASK_NAMES)
    metrics, models = {}, {}
    eval_started = time.perf_counter()
    for variant in RUNS:
        model, transform, tokenizer, _ = load_model(out_dir / "runs" / variant / "model.pt")
        models[variant] = model
        metrics[variant] = evaluate(model, tokenizer, transform, tasks, device="cpu")
    timings["eval_s"] = time.perf_counter() - eval_started

    _stage("4/4 writing results.json and report.html")
    curves = {
        variant: [json.loads(line) for line in (out_dir / "runs" / variant / "metrics.jsonl").read_text().splitlines()]
        for variant in RUNS
    }
    timings["total_s"] = time.perf_counter() - started
    results = {
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "heatmap_images"},
        "models": metrics,
        "training": {v: {"steps": s["steps"], "final_loss": s["final"].get("loss"), "skipped": s["skipped"]} for v, s in summaries.items()},
        "timings": timings,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    heatmaps = _heatmap_rows(models, transform, tokenizer, data_dir, settings.heatmap_images)
    write_report(out_dir / "report.html", results, loss_figure(curves), grouping_figure(heatmaps))
    _print_table(metrics)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'report.html'} in {timings['total_s']:.0f} s")
    print(f"browse both models: dreamlip serve --checkpoint {out_dir / 'runs' / 'dreamlip' / 'model.pt'} --compare {out_dir / 'runs' / 'clip' / 'model.pt'} --images {data_dir}")
    return results


def _print_table(metrics: dict[str, dict[str, float]]) -> None:
    from dreamlip.report import HEADLINE_METRICS

    print(f"\n{'metric':36s} {'clip':>8s} {'dreamlip':>9s}")
    for key in HEADLINE_METRICS:
        if all(key in m for m in metrics.values()):
            print(f"{key:36s} {metrics['clip'][key]:8.2f} {metrics['dreamlip'][key]:9.2f}")
