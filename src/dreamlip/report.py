"""The demo's HTML report: comparison table with baselines, loss and held-out learning curves,
grouping heatmaps and segmentation maps as embedded PNGs, phase times."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # the backend is the caller's: `dreamlip demo` picks Agg
import numpy as np

from dreamlip.eval.dense import DENSE_READOUTS
from dreamlip.io import atomic_write  # noqa: E402

__all__ = [
    "CURVE_METRICS",
    "HEADLINE_METRICS",
    "baseline_of",
    "eval_curve_figure",
    "grouping_figure",
    "heatmap_grid",
    "loss_figure",
    "segmentation_figure",
    "write_report",
]

# The training variants' names in the report's title; a variant not listed shows its name.
MODEL_LABELS = {"clip": "plain CLIP", "dreamlip": "DreamLIP", "siglip": "SigLIP", "flair": "FLAIR", "cosmos": "COSMOS"}
# The metrics a reader looks at first, in table order; the rest follow alphabetically.
HEADLINE_METRICS = (
    "retrieval/image_to_text_R@1",
    "retrieval/text_to_image_R@1",
    "long_retrieval/image_to_text_R@1",
    "long_retrieval/text_to_image_R@1",
    "segmentation/mIoU",
    "segmentation/objects/mIoU",
    "segmentation/calibrated/mIoU",
    "zeroshot/top1",
    "linear_probe/top1",
)
# Per read-out, the columns of the report's read-out table (metric key after the read-out's prefix).
READOUT_METRICS = {"mIoU": "mIoU", "pixel_acc": "pixel acc.", "objects/mIoU": "objects mIoU", "calibrated/mIoU": "calibrated mIoU"}
# The held-out metrics drawn against the training step (train-time eval records, "eval/<metric>").
CURVE_METRICS = (
    ("zeroshot/top1", "zero-shot top-1"),
    ("retrieval/image_to_text_R@1", "image→text R@1"),
    ("segmentation/mIoU", "segmentation mIoU (raw)"),
)


def baseline_of(baselines: dict[str, dict[str, float]], metric: str) -> float | None:
    """The no-knowledge score of ``metric`` (chance or background everywhere), if there is one."""
    return next((group[metric] for group in baselines.values() if metric in group), None)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def loss_figure(curves: dict[str, list[dict[str, Any]]]) -> str:
    """Training loss per step for each run (base64 PNG): each of its objective's terms (the
    records' ``loss/<term>``) drawn on its own, the first solid, the others dashed."""
    figure, axis = plt.subplots(figsize=(7, 3.6))
    for name, rows in curves.items():
        terms = list(dict.fromkeys(key for r in rows for key in r if key.startswith("loss/")))
        for index, term in enumerate(terms):
            points = [(r["step"], r[term]) for r in rows if term in r]
            axis.plot(*zip(*points), marker=".", linestyle="-" if index == 0 else "--",  # marker: a 1-record run shows
                      label=f"{name}: {term.removeprefix('loss/')}")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return _png(figure)


def eval_curve_figure(curves: dict[str, list[dict[str, Any]]], baselines: dict[str, dict[str, float]]) -> str:
    """Held-out metrics per step, one panel per metric, every run on the same axes, the
    no-knowledge baseline dotted (base64 PNG). ``curves``: each run's train-time eval records."""
    figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4.2 * len(CURVE_METRICS), 3.2), squeeze=False)
    for axis, (metric, label) in zip(axes[0], CURVE_METRICS):
        for name, rows in curves.items():
            points = [(r["step"], r[f"eval/{metric}"]) for r in rows if f"eval/{metric}" in r]
            if points:
                axis.plot(*zip(*points), marker="o", markersize=3, label=name)
        reference = baseline_of(baselines, metric)
        if reference is not None:
            axis.axhline(reference, color="grey", linestyle=":", label="chance" if "zeroshot" in metric else "background everywhere")
        axis.set_title(label, fontsize=9)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("%")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return _png(figure)


def segmentation_figure(rows: list[dict[str, Any]], classnames: list[str], ignore_index: int) -> str:
    """One row per image: the image, then label maps (ground truth first), one colour per class and
    a legend (base64 PNG). ``rows``: ``{"image": HxWx3 uint8, "title": str, "panels": [(title, HxW
    int labels)]}``."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    colours = plt.get_cmap("tab10" if len(classnames) <= 10 else "tab20")(np.arange(len(classnames)))
    colours[0] = (0.15, 0.15, 0.15, 1.0)  # class 0, background in the embedded set: dark, not a hue
    cmap = ListedColormap(colours)
    columns = 1 + max(len(r["panels"]) for r in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.1 * columns, 2.3 * len(rows) + 0.4), squeeze=False)
    for axis_row, row in zip(axes, rows):
        axis_row[0].imshow(row["image"])
        axis_row[0].set_title(row["title"], fontsize=8)
        for axis, (title, labels) in zip(axis_row[1:], row["panels"]):
            shown = np.ma.masked_equal(labels, ignore_index)  # ignored pixels stay white
            axis.imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(classnames) - 0.5, interpolation="nearest")
            axis.set_title(title, fontsize=8)
        for axis in axis_row:
            axis.axis("off")
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(classnames)]
    figure.legend(handles=handles, loc="lower center", ncol=min(len(classnames), 9), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.4 / (2.3 * len(rows) + 0.4), 1, 1))
    return _png(figure)


def grouping_figure(rows: list[dict[str, Any]]) -> str:
    """One row per image: the image, then each text's patch weights over it (base64 PNG).

    ``rows``: ``{"image": HxWx3 uint8, "title": str, "texts": [str], "weights": [grid_h x grid_w]}``.
    """
    columns = 1 + max(len(r["texts"]) for r in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(2.1 * columns, 2.4 * len(rows)), squeeze=False)
    for axis_row, row in zip(axes, rows):
        image = row["image"]
        axis_row[0].imshow(image)
        axis_row[0].set_title(row["title"], fontsize=8)
        for axis, text, weights in zip(axis_row[1:], row["texts"], row["weights"]):
            axis.imshow(image)
            axis.imshow(
                weights,
                cmap="inferno",
                alpha=0.6,
                extent=(0, image.shape[1], image.shape[0], 0),
                interpolation="bilinear",
            )
            axis.set_title(_wrap(text, 28), fontsize=7)
        for axis in axis_row:
            axis.axis("off")
    figure.tight_layout()
    return _png(figure)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:4])


def _is_dense(key: str) -> bool:
    """``segmentation/<read-out>/...``: tabulated in the read-out table, not the main one."""
    parts = key.split("/")
    return parts[0] == "segmentation" and len(parts) > 2 and parts[1] in DENSE_READOUTS


def _number(value: Any) -> str:
    return f"<td>{value:.2f}</td>" if isinstance(value, (int, float)) else "<td>-</td>"


def _metric_rows(models: dict[str, dict[str, float]], baselines: dict[str, dict[str, float]], *, headline: bool) -> list[str]:
    """The headline metrics in their order, or every other non-dense key alphabetically."""
    names = list(models)
    keys = sorted({k for metrics in models.values() for k in metrics if not _is_dense(k)})
    ordered = [k for k in HEADLINE_METRICS if k in keys] if headline else [k for k in keys if k not in HEADLINE_METRICS]
    rows = []
    for key in ordered:
        values = [models[n].get(key) for n in names]
        cells = "".join(_number(v) for v in values)
        # each model after the first against the first; counts (n_*) are no comparison
        comparable = isinstance(values[0], (int, float)) and not key.startswith("n_", key.rfind("/") + 1)
        deltas = "".join(_delta(value - values[0]) if comparable and isinstance(value, (int, float)) else "<td></td>"
                         for value in values[1:]) or "<td></td>"
        reference = baseline_of(baselines, key)
        rows.append(f"<tr><th>{html.escape(key)}</th>{cells}{deltas}{_number(reference) if reference is not None else '<td></td>'}</tr>")
    return rows


def _delta(diff: float) -> str:
    return f'<td class="{"up" if diff > 0 else "down" if diff < 0 else ""}">{diff:+.2f}</td>'


def _readout_rows(models: dict[str, dict[str, float]], segmentation: dict[str, dict[str, Any]]) -> list[str]:
    """mIoU, pixel accuracy and objects-only mIoU per read-out and model; each model's best dense
    read-out in bold."""
    readouts = ["raw"] + sorted({k.split("/")[1] for m in models.values() for k in m if _is_dense(k)})
    rows = []
    for readout in readouts:
        cells = ""
        for name, metrics in models.items():
            prefix = "segmentation/" if readout == "raw" else f"segmentation/{readout}/"
            best = segmentation.get(name, {}).get("best_dense") == readout
            for metric in READOUT_METRICS:
                cell = _number(metrics.get(prefix + metric))
                cells += cell.replace("<td>", '<td class="best">') if best else cell
        rows.append(f"<tr><th>{html.escape(readout)}</th>{cells}</tr>")
    return rows


def write_report(path: str | Path, results: dict[str, Any], figures: dict[str, str]) -> Path:
    """Write a self-contained HTML page (images embedded) from the demo's ``results`` and its
    ``figures`` (base64 PNGs keyed "loss", "eval", "grouping", "segmentation")."""
    models = results["models"]
    baselines = results.get("baselines", {})
    segmentation = results.get("segmentation", {})
    names = list(models)
    header = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    delta_header = "".join(f"<th>{html.escape(n)} − {html.escape(names[0])}</th>" for n in names[1:]) or "<th></th>"
    shown = html.escape(", ".join(names))
    readout_header = "".join(f"<th>{html.escape(n)} {label}</th>" for n in names for label in READOUT_METRICS.values())
    background = baselines.get("background_everywhere", {})
    commonest = baselines.get("commonest_shape_everywhere", {})
    calibration = results.get("settings", {}).get("seg_calibrate") or {"split": "training", "images": "?"}
    calibrated = "; ".join(
        f"{html.escape(n)}: <b>{html.escape(s['best_dense_calibrated'])}</b> {s['best_dense_calibrated_mIoU']:.2f} "
        f"at threshold {s['best_dense_calibrated_threshold']:.2f}"
        for n, s in segmentation.items()
        if "best_dense_calibrated" in s
    )
    best = "; ".join(
        f"{html.escape(n)}: <b>{html.escape(s['best_dense'])}</b> {s['best_dense_mIoU']:.2f} (raw {s['raw_mIoU']:.2f})"
        for n, s in segmentation.items()
    )
    timings = "".join(f"<tr><th>{html.escape(k.removesuffix('_s'))}</th><td>{v:.1f}</td></tr>" for k, v in results.get("timings", {}).items())
    settings = html.escape(json.dumps(results.get("settings", {}), indent=2))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dreamlip demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child {{ text-align: left; }} .up {{ color: #0a7d22; font-weight: 600; }} .down {{ color: #b00020; }}
.best {{ font-weight: 700; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>dreamlip demo: {html.escape(" vs ".join(MODEL_LABELS.get(n, n) for n in names))}</h1>
<p>Same model, data, steps and seed; only the training recipe differs: the texts per image and the
objective (the training variants of docs/method.md).
Evaluated on the held-out split, whose captions, prompts and class names use wording no training caption uses.
All numbers are percentages. <i>baseline</i>: what no knowledge scores, chance (1 / number of classes) for
classification, predicting background everywhere (the same metric code) for segmentation.</p>
<h2>Results</h2>
<table id="results"><tr><th>metric</th>{header}{delta_header}<th>baseline</th></tr>
{"".join(_metric_rows(models, baselines, headline=True))}
</table>
<details><summary>Every other metric of results.json (recall at 5 and 10, per-class IoU, counts)</summary>
<table id="all-metrics"><tr><th>metric</th>{header}{delta_header}<th>baseline</th></tr>
{"".join(_metric_rows(models, baselines, headline=False))}
</table>
</details>
<h2>Segmentation read-outs</h2>
<p>The raw patch tokens and the training-free dense read-outs of the last block (docs/eval.md); best dense
read-out per model (bold; picked on this test split, so an optimistic choice): {best}.
Background everywhere scores mIoU {background.get("segmentation/mIoU", float("nan")):.2f},
pixel accuracy {background.get("segmentation/pixel_acc", float("nan")):.2f}.
<i>objects</i>: scored as VOC20 is, background pixels left out and never predicted, so only what the
patches say about the objects counts; the commonest shape everywhere scores
{commonest.get("segmentation/objects/mIoU", float("nan")):.2f} there.
<i>calibrated</i>: background gets no prompt; a pixel is background when its highest object-class
probability is below a threshold, chosen per model and read-out on the first {calibration["images"]}
{html.escape(calibration["split"])} images' masks (never the test masks): {calibrated}.</p>
<table id="readouts"><tr><th>read-out</th>{readout_header}</tr>
{"".join(_readout_rows(models, segmentation))}
</table>
<h2>Training loss</h2>
<img id="loss-curves" alt="training loss curves: {shown}" src="data:image/png;base64,{figures["loss"]}">
<h2>Held-out metrics during training</h2>
<p>Evaluated on the test split every {html.escape(str(results.get("settings", {}).get("eval_every", "?")))} steps
(segmentation: raw read-out); dotted: the baseline.</p>
<img id="eval-curves" alt="held-out learning curves: {shown}" src="data:image/png;base64,{figures["eval"]}">
<h2>Grouping: where each sub-caption looks</h2>
<p>Each heatmap is a sub-caption's patch weights (min-max normalised similarities above 1/N, renormalised),
the weights the grouping loss pools patch tokens with.</p>
<img id="grouping-heatmaps" alt="grouping heatmaps: {shown}" src="data:image/png;base64,{figures["grouping"]}">
<h2>Zero-shot segmentation maps</h2>
<p>The ground-truth mask, then each model's label map with the raw read-out and with its best dense read-out.</p>
<img id="segmentation-maps" alt="segmentation maps: {shown}" src="data:image/png;base64,{figures["segmentation"]}">
<h2>Phase times (seconds)</h2>
<p>Training includes its held-out evaluations (train_eval_*); report writing and the total are in results.json.</p>
<table id="timings">{timings}</table>
<h2>Settings</h2>
<pre>{settings}</pre>
</body></html>
"""
    path = Path(path)
    atomic_write(path, lambda handle: handle.write(page))
    return path


def heatmap_grid(weights: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[N] patch weights -> [grid_h, grid_w], scaled to [0, 1] for display."""
    square = weights.reshape(grid)
    return square / max(float(square.max()), 1e-12)
