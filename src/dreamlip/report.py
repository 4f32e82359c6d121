"""The demo's HTML report: comparison table, loss curves and grouping heatmaps as embedded PNGs."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # the backend is the caller's: `dreamlip demo` picks Agg
import numpy as np

__all__ = ["HEADLINE_METRICS", "grouping_figure", "heatmap_grid", "loss_figure", "write_report"]

# The metrics a reader looks at first, in table order; the rest follow alphabetically.
HEADLINE_METRICS = (
    "retrieval/image_to_text_R@1",
    "retrieval/text_to_image_R@1",
    "long_retrieval/image_to_text_R@1",
    "long_retrieval/text_to_image_R@1",
    "segmentation/mIoU",
    "zeroshot/top1",
    "linear_probe/top1",
)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def loss_figure(curves: dict[str, list[dict[str, Any]]]) -> str:
    """Training loss per step for each run (base64 PNG); DreamLIP's two terms drawn separately."""
    figure, axis = plt.subplots(figsize=(7, 3.6))
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axis.plot(steps, [r["mpcl"] for r in rows], label=f"{name}: contrastive")
        if any(r.get("group") is not None for r in rows):
            axis.plot(steps, [r["group"] for r in rows], linestyle="--", label=f"{name}: grouping")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
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


def _metric_rows(models: dict[str, dict[str, float]]) -> list[str]:
    names = list(models)
    keys = sorted({k for metrics in models.values() for k in metrics})
    ordered = [k for k in HEADLINE_METRICS if k in keys] + [k for k in keys if k not in HEADLINE_METRICS]
    rows = []
    for key in ordered:
        values = [models[n].get(key) for n in names]
        cells = "".join(f"<td>{v:.2f}</td>" if isinstance(v, (int, float)) else "<td>-</td>" for v in values)
        delta = ""
        if len(values) == 2 and all(isinstance(v, (int, float)) for v in values) and not key.endswith("n_images"):
            diff = values[1] - values[0]
            delta = f'<td class="{"up" if diff > 0 else "down" if diff < 0 else ""}">{diff:+.2f}</td>'
        else:
            delta = "<td></td>"
        rows.append(f"<tr><th>{html.escape(key)}</th>{cells}{delta}</tr>")
    return rows


def write_report(path: str | Path, results: dict[str, Any], loss_png: str, grouping_png: str) -> Path:
    """Write a self-contained HTML page (images embedded) from the demo's ``results``."""
    models = results["models"]
    names = list(models)
    header = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    delta_header = f"<th>{html.escape(names[1])} − {html.escape(names[0])}</th>" if len(names) == 2 else "<th></th>"
    settings = html.escape(json.dumps(results.get("settings", {}), indent=2))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dreamlip demo report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child {{ text-align: left; }} .up {{ color: #0a7d22; font-weight: 600; }} .down {{ color: #b00020; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>dreamlip demo: plain CLIP vs DreamLIP</h1>
<p>Same model, data, steps and seed; only the texts per image and the grouping loss differ.
Evaluated on the held-out split, whose captions, prompts and class names use wording no training caption uses.
All numbers are percentages.</p>
<h2>Results</h2>
<table id="results"><tr><th>metric</th>{header}{delta_header}</tr>
{"".join(_metric_rows(models))}
</table>
<h2>Training loss</h2>
<img id="loss-curves" alt="training loss curves" src="data:image/png;base64,{loss_png}">
<h2>Grouping: where each sub-caption looks</h2>
<p>Each heatmap is a sub-caption's patch weights (min-max normalised similarities above 1/N, renormalised),
the weights the grouping loss pools patch tokens with.</p>
<img id="grouping-heatmaps" alt="grouping heatmaps" src="data:image/png;base64,{grouping_png}">
<h2>Settings</h2>
<pre>{settings}</pre>
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path


def heatmap_grid(weights: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[N] patch weights -> [grid_h, grid_w], scaled to [0, 1] for display."""
    square = weights.reshape(grid)
    return square / max(float(square.max()), 1e-12)
