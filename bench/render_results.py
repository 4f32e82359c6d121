"""Render the result tables of the README and docs from the committed result files.

A table lives in a Markdown file between two markers; the opening one names what to render:

    <!-- rendered: demo bench/results/demo.json -->
    <!-- rendered: ablation bench/results/ablation-embedded.json clip short dreamlip -->
    <!-- rendered: train_step bench/results/train_step.json DreamLIP-ViT-Tiny-64/cpu/batch64/k6 -->
    <!-- end rendered -->

``demo`` is a ``dreamlip demo --record`` file, ``ablation`` a ``bench/ablation.py --record`` file
followed by the rungs to show, in order (mean ± sample sd over the seeds), ``train_step`` a
``bench/train_step.py --record`` file followed by the runs to show (``MODEL/DEVICE/batchB/kK``), a
table each. Every table ends with the commands, commits and machines its numbers came from.

    python bench/render_results.py           # rewrite the tables in README.md and docs/*.md
    python bench/render_results.py --check   # exit 1 naming each table that differs (the tests run this)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"(<!-- rendered: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- end rendered -->)", re.S)
DENSE = ("maskclip", "clearclip", "sclip", "naclip")

# The rungs' names in tables; a rung not listed shows its name.
RUNG_LABELS = {
    "clip": "CLIP (raw caption)",
    "long-whole": "+ long caption as one text",
    "long-whole+ctx248": "+ long caption as one text, 248-token context (`model.context_length=248`)",
    "subcaptions": "+ sub-captions (sentences)",
    "short": "+ sub-captions + short captions (no grouping)",
    "dreamlip": "+ grouping, other images as negatives, constant weight (the paper's schedule)",
    "dreamlip+notextgrad": "DreamLIP at constant weight, text gradient stopped (`loss.group_text_grad=false`)",
    "dreamlip+noprojgrad": "DreamLIP at constant weight, the class token's projection left alone (`loss.group_projection_grad=false`)",
    "dreamlip+notextgrad-noprojgrad": "DreamLIP at constant weight, both (`loss.group_text_grad=false loss.group_projection_grad=false`)",
    "dreamlip+w05": "DreamLIP, grouping weight 0.5, constant (`loss.group_weight=0.5`)",
    "dreamlip+ramp400": "DreamLIP, the grouping weight ramped from 0 over the whole run (`loss.group_warmup_fraction=1`, here `loss.group_warmup_steps=400`)",
    "dreamlip+ramp05": "DreamLIP with the term's text gradient from the first step (the paper's; `loss.group_text_grad_start=0`)",
    "dreamlip+ramp025": "DreamLIP, the ramp over the run's first quarter (`loss.group_warmup_fraction=0.25`)",
    "dreamlip+both": "DreamLIP, long captions whole in the sub-caption pool too (`captions.long_mode=sentences+whole`)",
    "dreamlip+whole": "DreamLIP, long captions whole instead of as sentences (`captions.long_mode=whole`)",
    "dreamlip+slotsall": "DreamLIP, the raw caption grouped too (`loss.group_slots=all`)",
    "dreamlip+globaltemp": "DreamLIP, grouping at the global temperature (`loss.group_temperature=global`)",
    "dreamlip+temp002": "DreamLIP, the grouping temperature starting at 0.02 (`loss.group_temperature_init=0.02`)",
    "dreamlip+thr05": "DreamLIP, pooling threshold 0.5 instead of 1/N (`loss.group_threshold=0.5`)",
    "dreamlip+textlate": "+ grouping, its weight ramped from 0 over the run's first half, its gradient to the texts from the run's half on (**DreamLIP, the default**; `loss.group_warmup_fraction=0.5 loss.group_text_grad_start=0.5`)",
    "dreamlip+textstop": "DreamLIP, its gradient to the patches only for the whole run (`loss.group_text_grad=false`)",
    "dreamlip+batchneg": "DreamLIP, the authors' negatives: every sub-caption of the batch (`loss.group_negatives=batch`)",
    "dreamlip+imageneg": "DreamLIP, the paper's negatives: the image's own other sub-captions (`loss.group_negatives=image`)",
    "dreamlip+token": "DreamLIP at SPARC's token level, the text's other tokens as negatives (`loss.group_granularity=token loss.group_negatives=image`)",
    "siglip": "SigLIP (sigmoid loss, the same texts; its bias from the batch's prior, the default)",
    "siglip+b10": "SigLIP, its bias from the papers' -10 (`loss.sigmoid_bias_init=-10`)",
    "siglip+k0": "SigLIP on the raw caption only, bias from -10 (`captions.k=0`; compare CLIP)",
    "siglip+lr100": "SigLIP, bias from -10, its scale and bias at 100x the lr (`optim.logit_lr_multiplier=100`)",
    "siglip+b4": "SigLIP, its bias from -4 (`loss.sigmoid_bias_init=-4`)",
    "flair": "FLAIR (text-conditioned pooling, its caption sampling; its bias from the batch's prior, the default)",
    "flair+b10": "FLAIR, its bias from the papers' -10 (`loss.flair_bias_init=-10`)",
    "flair+lr100": "FLAIR, bias from -10, its scale and bias at 100x the lr (`optim.logit_lr_multiplier=100`)",
    "flair+b4": "FLAIR, its bias from -4 (`loss.flair_bias_init=-4`)",
    "flair+dreamlip": "FLAIR + DreamLIP, weights 1 and 1 (`loss.objective=flair+dreamlip`; the term's text gradient on from the first step, `loss.group_text_grad_start=0`)",
    "flair+dreamlip-group": "FLAIR + DreamLIP's grouping term alone (`loss.objective=flair+dreamlip loss.global_weight=0 loss.group_text_grad_start=0`)",
    "dreamlip+cool025": "DreamLIP, the grouping weight also falling back to 0 over the run's last quarter (`loss.group_cooldown_fraction=0.25`)",
    "dreamlip+cool05": "DreamLIP, the grouping weight rising over the first half and falling over the second (`loss.group_cooldown_fraction=0.5`)",
    "dreamlip+imagestop": "DreamLIP, the grouping term's patch gradient stopped: it trains the texts only (`loss.group_image_grad=false loss.group_text_grad_start=0`)",
    "dreamlip+ramp05w05": "DreamLIP, grouping weight 0.5, ramped over the first half (`loss.group_weight=0.5`)",
    "dreamlip+adapter": "DreamLIP, the sub-captions through a linear map of the term's own (`loss.group_text_adapter=true loss.group_text_grad_start=0`)",
    "dreamlip+text025": "DreamLIP, a quarter of the term's gradient to the texts (`loss.group_text_grad=0.25 loss.group_text_grad_start=0`)",
    "dreamlip+textstop-w05": "DreamLIP, the text gradient stopped, grouping weight 0.5 (`loss.group_text_grad=false loss.group_weight=0.5`)",
    "dreamlip+t02": "DreamLIP, the grouping temperature starting at 0.2 (`loss.group_temperature_init=0.2`)",
    "dreamlip+adapter-textstop": "DreamLIP, that map learning while the texts' gradient is stopped (`loss.group_text_adapter=true loss.group_text_grad=false`)",
    "dreamlip+textstop-thr05": "DreamLIP, its gradient to the patches only, pooling threshold 0.5 (`loss.group_text_grad=false loss.group_threshold=0.5`)",
    "dreamlip+textstop-gtemp": "DreamLIP, its gradient to the patches only, at the global temperature (`loss.group_text_grad=false loss.group_temperature=global`)",
    "dreamlip+textstop-slotsall": "DreamLIP, its gradient to the patches only, the raw caption grouped too (`loss.group_text_grad=false loss.group_slots=all`)",
    "dreamlip+textstop-noprojgrad": "DreamLIP, its gradient to the patches only, the class token's projection left alone (`loss.group_text_grad=false loss.group_projection_grad=false`)",
    "clip+small800": "CLIP (raw caption), the Small-64 tower, 800 steps",
    "short+small800": "+ sub-captions + short captions (no grouping), the Small-64 tower, 800 steps",
    "dreamlip+small800": "DreamLIP, its gradient to the patches only (`loss.group_text_grad=false`), the Small-64 tower, 800 steps",
    "dreamlip+small800-default": "DreamLIP (the default), the Small-64 tower, 800 steps",
    "siglip+small800": "SigLIP, the Small-64 tower, 800 steps",
    "flair+small800": "FLAIR, the Small-64 tower, 800 steps",
    "cosmos+small800": "COSMOS, the Small-64 tower, 800 steps",
    "cosmos+small800-dreamlip": "COSMOS + DreamLIP's grouping (`loss.objective=cosmos+dreamlip loss.global_weight=0`), the Small-64 tower, 800 steps",
    "cosmos": "COSMOS (multi-crop views, text crops, EMA teacher)",
    "cosmos+dreamlip": "COSMOS + DreamLIP's grouping term (`--variants cosmos --set loss.objective=cosmos+dreamlip loss.global_weight=0 loss.group_text_grad_start=0`)",
}

# (label, metric key) of the ablation tables; "best dense" columns pick the dense read-out with the
# highest mean over the seeds, named in the cell.
ABLATION_COLUMNS = (
    ("I→T R@1", "retrieval/image_to_text_R@1"),
    ("T→I R@1", "retrieval/text_to_image_R@1"),
    ("long I→T R@1", "long_retrieval/image_to_text_R@1"),
    ("long T→I R@1", "long_retrieval/text_to_image_R@1"),
    ("zero-shot top-1", "zeroshot/top1"),
    ("linear probe top-1", "linear_probe/top1"),
    ("seg raw", "segmentation/mIoU"),
    ("seg best dense", "segmentation/{}/mIoU"),
    ("objects raw", "segmentation/objects/mIoU"),
    ("objects best dense", "segmentation/{}/objects/mIoU"),
    ("calibrated raw", "segmentation/calibrated/mIoU"),
    ("calibrated best dense", "segmentation/{}/calibrated/mIoU"),
)

DEMO_ROWS = (
    ("retrieval image→text R@1 / R@5", ("retrieval/image_to_text_R@1", "retrieval/image_to_text_R@5"), None),
    ("retrieval text→image R@1 / R@5", ("retrieval/text_to_image_R@1", "retrieval/text_to_image_R@5"), None),
    ("long-caption retrieval image→text / text→image R@1",
     ("long_retrieval/image_to_text_R@1", "long_retrieval/text_to_image_R@1"), None),
    ("zero-shot classification top-1", ("zeroshot/top1",), ("chance", "zeroshot/top1", "chance")),
    ("linear probe top-1", ("linear_probe/top1",), ("chance", "linear_probe/top1", "chance")),
    ("segmentation mIoU, raw patch tokens", ("segmentation/mIoU",),
     ("background_everywhere", "segmentation/mIoU", "background everywhere")),
    ("segmentation mIoU, objects only, raw patch tokens", ("segmentation/objects/mIoU",),
     ("commonest_shape_everywhere", "segmentation/objects/mIoU", "commonest class everywhere")),
    ("segmentation mIoU, background by a calibrated threshold, raw patch tokens", ("segmentation/calibrated/mIoU",),
     ("background_everywhere", "segmentation/mIoU", "background everywhere")),
)


def _provenance_lines(entries: list[dict[str, Any]]) -> list[str]:
    def distinct(field: str) -> list[str]:
        return sorted({e.get("provenance", {}).get(field, "not recorded") for e in entries})

    commands = distinct("command")
    lines = ["", "Commands: " + "; ".join(f"`{c}`" for c in commands) if len(commands) > 1 else f"Command: `{commands[0]}`"]
    lines.append("")  # a paragraph of its own: a long command list would run into it
    lines.append(f"Commit{'s' if len(distinct('commit')) > 1 else ''}: " + ", ".join(f"`{c}`" for c in distinct("commit"))
                 + f". Machine: {'; '.join(distinct('machine'))}.")
    return lines


def _phase_order(key: str, names: list[str]) -> tuple[int, int]:
    """Where the demo's phase ``key`` runs: data, each model's training in the models' order,
    evaluation, report (result files keep keys sorted)."""
    trainings = [f"train_{name}_s" for name in names]
    if key in trainings:
        return 1, trainings.index(key)
    return {"data_s": (0, 0), "eval_s": (2, 0), "report_s": (3, 0)}.get(key, (4, 0))


def render_demo(path: Path) -> str:
    runs = json.loads(path.read_text())
    if len(runs) != 1:
        raise ValueError(f"{path}: a demo table shows one recorded demo, found {sorted(runs)}")
    (entry,) = runs.values()
    models, baselines, seg = entry["models"], entry["baselines"], entry["segmentation"]
    names = entry["settings"].get("models", list(models))  # the order the demo ran them in; sorted in the file
    lines = ["| metric (%) | " + " | ".join(n.replace("clip", "CLIP").replace("dreamlip", "DreamLIP") for n in names)
             + " | baseline |", "|---|" + "---|" * (len(names) + 1)]

    def cell(name: str, keys: tuple[str, ...]) -> str:
        values = [models[name][k] for k in keys]
        best = all(models[name][k] >= max(models[other][k] for other in names) for k in keys) and len(names) > 1
        text = " / ".join(f"{v:.1f}" for v in values)
        return f"**{text}**" if best else text

    for label, keys, baseline in DEMO_ROWS:
        reference = f"{baselines[baseline[0]][baseline[1]]:.1f} ({baseline[2]})" if baseline else ""
        lines.append(f"| {label} | " + " | ".join(cell(n, keys) for n in names) + f" | {reference} |")
    dense = {n: seg[n]["best_dense"] for n in names}
    best = {n: (seg[n]["best_dense_mIoU"], seg[n]["best_dense_objects_mIoU"]) for n in names}
    lines.append("| segmentation mIoU / objects only, best dense read-out | "
                 + " | ".join(f"{best[n][0]:.1f} / {best[n][1]:.1f} ({dense[n]})" for n in names) + " | |")
    timings = entry["timings"]
    lines += ["", f"{entry['settings']['n_train']} training and {entry['settings']['n_test']} held-out images, "
              f"{entry['settings']['steps']} steps of {entry['settings']['batch_size']}, seed {entry['settings']['seed']}; "
              f"{timings['total_s'] / 60:.1f} min in all by `results.json` ("
              + ", ".join(f"{k.removesuffix('_s')} {v:.0f} s" for k, v in sorted(timings.items(), key=lambda item: _phase_order(item[0], names))
                          if k != "total_s" and not k.startswith("train_eval")) + ")."]
    return "\n".join(lines + _provenance_lines([entry])) + "\n"


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _rung_entries(path: Path, runs: dict[str, Any], spec: str) -> tuple[str, str, list[dict[str, Any]]]:
    """``spec`` (``RUNG`` or ``RUNG:conditioned``) as its rung, its scoring and its runs."""
    rung, _, scoring = spec.partition(":")
    if scoring not in ("", "conditioned"):
        raise ValueError(f"{path}: rung {spec!r}: the only scoring a rung takes is ':conditioned'")
    entries = [entry for key, entry in sorted(runs.items()) if key.rsplit("/", 1)[0] == rung]
    if not entries:
        raise ValueError(f"{path}: no runs of rung {rung!r} (it has {sorted({k.rsplit('/', 1)[0] for k in runs})})")
    if len({json.dumps(e["settings"], sort_keys=True) for e in entries}) > 1:
        raise ValueError(f"{path}: the runs of rung {rung!r} were made with different settings")
    return rung, scoring, entries


def _values(entries: list[dict[str, Any]], column: str, scoring: str) -> tuple[list[float], str]:
    """Each seed's value of ``column`` (empty where a run lacks it) and, for a "best dense"
    column, the read-out with the highest mean."""
    task, _, name = column.partition("/")
    metric = f"{task}/conditioned_{name}" if scoring else column
    readout = ""
    if "{}" in metric:
        complete = [r for r in DENSE if all(metric.format(r) in e for e in entries)]
        if not complete:
            return [], ""
        readout = max(complete, key=lambda r: statistics.mean(e[metric.format(r)] for e in entries))
        metric = metric.format(readout)
    return ([e[metric] for e in entries] if all(metric in e for e in entries) else []), readout


def _label(rung: str, scoring: str, labels: dict[str, str] = RUNG_LABELS) -> str:
    return labels.get(rung, RUNG_LABELS.get(rung, rung)) + (", scored by text-conditioned embeddings" if scoring else "")


def render_ablation(path: Path, rungs: list[str]) -> str:
    """A table of ``rungs`` (mean ± sd over each rung's seeds); ``RUNG:conditioned`` is the rung
    scored by its text-conditioned embeddings (FLAIR's pooler), its other cells empty."""
    runs = json.loads(path.read_text())
    lines = ["| rung | seeds | " + " | ".join(label for label, _ in ABLATION_COLUMNS) + " |",
             "|---|---|" + "---|" * len(ABLATION_COLUMNS)]
    shown = []
    for spec in rungs:
        rung, scoring, entries = _rung_entries(path, runs, spec)
        shown += entries
        cells = []
        for _, column in ABLATION_COLUMNS:
            values, readout = _values(entries, column, scoring)
            cells.append(f"{_mean_sd(values)}{f' ({readout})' if readout else ''}" if values else "")
        lines.append(f"| {_label(rung, scoring)} | {len(entries)} | " + " | ".join(cells) + " |")
    settings = shown[0]["settings"]
    lines += ["", f"{settings['n_train']} training and {settings['n_test']} held-out images, {settings['steps']} steps "
              f"of {settings['batch_size']}, K = {settings['k']}; mean ± sample sd over the seeds, %."]
    return "\n".join(lines + _provenance_lines(shown)) + "\n"


def render_readouts(path: Path, rungs: list[str]) -> str:
    """Segmentation mIoU of ``rungs`` under every read-out, with background / objects only."""
    runs = json.loads(path.read_text())
    readouts = ("raw", "maskclip", "sclip", "clearclip", "naclip")
    lines = ["| rung | seeds | " + " | ".join(readouts) + " |", "|---|---|" + "---|" * len(readouts)]
    shown = []
    for spec in rungs:
        rung, scoring, entries = _rung_entries(path, runs, spec)
        shown += entries
        cells = []
        for readout in readouts:
            prefix = "segmentation/" if readout == "raw" else f"segmentation/{readout}/"
            pair = [_values(entries, f"{prefix}{metric}", scoring)[0] for metric in ("mIoU", "objects/mIoU")]
            cells.append(" / ".join(_mean_sd(values) for values in pair) if all(pair) else "")
        lines.append(f"| {_label(rung, scoring)} | {len(entries)} | " + " | ".join(cells) + " |")
    settings = shown[0]["settings"]
    lines += ["", f"mIoU with background / objects only; {settings['n_test']} held-out images, {settings['steps']} steps "
              f"of {settings['batch_size']}, K = {settings['k']}; mean ± sample sd over the seeds, %."]
    return "\n".join(lines + _provenance_lines(shown)) + "\n"


# (label, metric key) of the objectives' comparison: the headline of each task
COMPARISON_COLUMNS = (
    ("I→T R@1", "retrieval/image_to_text_R@1"),
    ("T→I R@1", "retrieval/text_to_image_R@1"),
    ("long I→T R@1", "long_retrieval/image_to_text_R@1"),
    ("zero-shot top-1", "zeroshot/top1"),
    ("linear probe top-1", "linear_probe/top1"),
    ("seg objects only", "segmentation/objects/mIoU"),
    ("seg calibrated", "segmentation/calibrated/mIoU"),
)
DATASET_NAMES = {"synthetic": "embedded", "real": "real-image"}
# The objectives' names in the comparison; a rung not listed has its ladder label
OBJECTIVE_LABELS = {
    "clip": "CLIP (raw caption only)",
    "short": "DreamLIP's texts, no grouping",
    "dreamlip+textlate": "DreamLIP (the default)",
    "siglip": "SigLIP",
    "flair": "FLAIR",
    "flair+dreamlip": "FLAIR + DreamLIP",
    "cosmos": "COSMOS",
    "cosmos+dreamlip": "COSMOS + DreamLIP's grouping",
}
# The larger-scale rungs (`--set model.name=DreamLIP-ViT-Small-64 --tag small800`) are named as their
# demo-recipe counterparts; the table's footer names the tower
OBJECTIVE_LABELS |= {f"{rung}+small800": OBJECTIVE_LABELS[rung] for rung in ("clip", "short", "siglip", "flair", "cosmos")}
OBJECTIVE_LABELS["dreamlip+small800-default"] = OBJECTIVE_LABELS["dreamlip+textlate"]
OBJECTIVE_LABELS["cosmos+small800-dreamlip"] = OBJECTIVE_LABELS["cosmos+dreamlip"]


def _level_with_best(cells: dict[int, list[float]]) -> set[int]:
    """The rows whose mean ± sd reaches the best mean's: the best and every row level with it
    within the spreads (a one-seed row has no spread)."""
    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    best = max(cells, key=lambda row: statistics.mean(cells[row]))
    floor = statistics.mean(cells[best]) - spread(cells[best])
    return {row for row, values in cells.items() if statistics.mean(values) + spread(values) >= floor}


def _step_costs(spec: str, root: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """``steps=FILE:KEY``: each step's time against open_clip's CLIP step in that recorded
    ``bench/train_step.py`` run, by the step's name, and the run itself."""
    source, _, key = spec.removeprefix("steps=").partition(":")
    if not (root / source).is_file():
        raise ValueError(f"{spec}: no result file {source}")
    run = _train_step_run(root / source, key)
    return {row["name"]: row["ratio_to_open_clip"] for row in run["results"]}, run


def render_comparison(paths: list[Path], rungs: list[str], root: Path = ROOT) -> str:
    """The same ``rungs`` on each result file's data set, one block of rows per set, in bold the
    best mean of each column and set and every rung level with it within the spreads. With a
    ``steps=FILE:KEY`` among the rungs, a last column gives each objective's training step time
    against open_clip's CLIP step from that ``bench/train_step.py`` run (a tagged rung, such as
    ``dreamlip+ramp05``, costs what its objective's step does)."""
    step_specs = [spec for spec in rungs if spec.startswith("steps=")]
    rungs = [spec for spec in rungs if not spec.startswith("steps=")]
    steps, step_run = _step_costs(step_specs[0], root) if step_specs else ({}, None)
    columns = [label for label, _ in COMPARISON_COLUMNS] + (["step time vs open_clip"] if step_run else [])
    lines = ["| data set | objective | seeds | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    shown = []
    for path in paths:
        runs = json.loads(path.read_text())
        rows = [_rung_entries(path, runs, spec) for spec in rungs]
        shown += [entry for _, _, entries in rows for entry in entries]
        dataset = rows[0][2][0]["settings"].get("dataset", path.stem)
        values = [[_values(entries, column, scoring)[0] for _, column in COMPARISON_COLUMNS] for _, scoring, entries in rows]
        bold = [_level_with_best({i: v[c] for i, v in enumerate(values) if v[c]}) for c in range(len(COMPARISON_COLUMNS))]
        for i, (rung, scoring, entries) in enumerate(rows):
            cells = [(f"**{_mean_sd(v)}**" if i in bold[c] else _mean_sd(v)) if v else "" for c, v in enumerate(values[i])]
            if step_run:
                cost = _step_cost(steps, rung, entries)
                cells.append(f"{cost:.2f}x" if cost is not None and not scoring else "")
            lines.append(f"| {DATASET_NAMES.get(dataset, dataset)} | {_label(rung, scoring, OBJECTIVE_LABELS)} | {len(entries)} | " + " | ".join(cells) + " |")
    settings = shown[0]["settings"]
    towers = {_set_value(entry["settings"], "model.name") for entry in shown}
    recipes = {tuple(entry["settings"][name] for name in ("n_train", "n_test", "steps", "batch_size", "k")) for entry in shown}
    if len(towers) > 1 or len(recipes) > 1:  # the footer states one recipe for the whole table
        raise ValueError(f"comparison {' '.join(rungs)}: its runs differ in tower or recipe ({towers}, {recipes})")
    (model,) = towers
    tower = f", the {model} tower" if model else ""
    lines += ["", f"{settings['n_train']} training and {settings['n_test']} held-out images a set, {settings['steps']} steps "
              f"of {settings['batch_size']}, K = {settings['k']}{tower}; mean ± sample sd over the seeds, %. Bold: the best mean "
              "of the column on that set and every objective whose mean + sd reaches the best's mean - sd."]
    if step_run:
        step_settings = step_run["settings"]
        lines.append(f"Step time: the median ratio of `bench/train_step.py`'s interleaved rounds ({step_settings['model']}, "
                     f"{step_settings['device']}, batch {step_settings['batch']}, docs/speed.md).")
    return "\n".join(lines + _provenance_lines(shown + ([step_run] if step_run else []))) + "\n"


def _set_value(settings: dict[str, Any], key: str) -> str | None:
    """The value a study's ``--set`` gave ``key`` (the last, as the config layering keeps it), None if unset."""
    values = [item.split("=", 1)[1] for item in settings.get("set", []) if item.startswith(f"{key}=")]
    return values[-1] if values else None


def _step_cost(steps: dict[str, float], rung: str, entries: list[dict[str, Any]]) -> float | None:
    """The recorded step cost of a rung's objective: a rung that sets ``loss.objective`` (a
    combination such as ``cosmos+dreamlip``) costs what that objective's step does, if recorded;
    another tagged rung (``dreamlip+ramp05``) what its variant's does."""
    objective = _set_value(entries[0]["settings"], "loss.objective")
    if objective is not None:
        return steps.get(objective)
    return steps.get(rung, steps.get(rung.split("+")[0]))


def _train_step_run(path: Path, key: str) -> dict[str, Any]:
    """The recorded ``bench/train_step.py`` run ``key`` of ``path``."""
    runs = json.loads(path.read_text())
    if key not in runs:
        raise ValueError(f"{path}: no run {key!r} (it has {sorted(runs)})")
    return runs[key]


def render_train_step(path: Path, keys: list[str]) -> str:
    """One table per recorded ``bench/train_step.py`` run named in ``keys``, one row per step."""
    tables = []
    for key in keys:
        entry = _train_step_run(path, key)
        settings = entry["settings"]
        lines = [f"| step ({settings['model']}, {settings['device']}, batch {settings['batch']}) | time vs open_clip "
                 "(interquartile range) | FLOPs vs open_clip | time / FLOP ratio | step ms |", "|---|---|---|---|---|"]
        for row in entry["results"]:
            low, high = row["ratio_iqr"]
            lines.append(f"| {row['label']} | {row['ratio_to_open_clip']:.2f} ({low:.2f}-{high:.2f}) | {row['flop_ratio']:.2f} "
                         f"| {row['time_over_flop_ratio']:.2f} | {row['step_ms']:.0f} |")
        lines += ["", f"Median of {settings['rounds']} interleaved rounds' ratios, {settings['threads']} "
                  f"thread{'s' if settings['threads'] > 1 else ''}, load average {entry['load_average_at_start']:.2f} "
                  "when the run started."]
        tables.append("\n".join(lines + _provenance_lines([entry])) + "\n")
    return "\n".join(tables)


RENDERERS: dict[str, Callable[..., str]] = {"demo": render_demo, "ablation": render_ablation, "readouts": render_readouts,
                                             "train_step": render_train_step}
# Kinds whose tables read several result files, named comma-separated
MULTI_SOURCE = {"comparison": render_comparison}


def render_file(text: str, root: Path = ROOT) -> str:
    """``text`` with every marked table rendered anew from its result file."""

    def replace(match: re.Match) -> str:
        kind, source, *rest = match["spec"].split()
        if kind not in RENDERERS and kind not in MULTI_SOURCE:
            raise ValueError(f"<!-- rendered: {match['spec']} -->: unknown table kind {kind!r}; known: {sorted(RENDERERS | MULTI_SOURCE)}")
        sources = source.split(",") if kind in MULTI_SOURCE else [source]
        for name in sources:
            if not (root / name).is_file():
                raise ValueError(f"<!-- rendered: {match['spec']} -->: no result file {name}")
        if kind in MULTI_SOURCE:
            return match.group(1) + MULTI_SOURCE[kind]([root / name for name in sources], rest, root) + match.group(4)
        return match.group(1) + RENDERERS[kind](root / source, *([rest] if rest else [])) + match.group(4)

    return MARKER.sub(replace, text)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its data")
    args = parser.parse_args()
    stale = []
    for path in documents():
        text = path.read_text()
        try:
            rendered = render_file(text)
        except (ValueError, KeyError) as err:
            print(f"{path.relative_to(ROOT)}: {err}", file=sys.stderr)
            return 2
        if rendered != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(rendered)
    if args.check and stale:
        print("tables out of date with bench/results/ (run python bench/render_results.py): "
              + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(map(str, stale))) if stale else "every table matches its result file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
