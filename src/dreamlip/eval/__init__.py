"""Evaluation: zero-shot classification, retrieval, zero-shot segmentation and linear probe.

One entry point for the CLI and for the trainer (every N steps)::

    from dreamlip.eval import build_tasks, evaluate
    tasks = build_tasks("demo-out")                      # built once, data read on first use
    metrics = evaluate(model, tokenizer, eval_transform, tasks, device="cuda")
    # {"zeroshot/top1": 41.2, "retrieval/image_to_text_R@1": ..., "segmentation/mIoU": ..., ...}

Tasks are :class:`ZeroShotTask`, :class:`RetrievalTask`, :class:`SegmentationTask` and
:class:`LinearProbeTask` objects, or plain dicts ``{"task": "zeroshot", "data": ..., ...}`` (from
a config file). Metrics are percentages keyed ``<task name>/<metric>``, all floats (counts such as
``n_images`` included), so they log and tabulate directly; each task's ``describe()`` gives the
settings behind them (templates, long-text policy, background handling), which the CLI writes
next to the metrics. See docs/eval.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .conditioned import Conditioning
from .datasets import EvalDataError
from .encode import EvalContext
from .linear_probe import LinearProbeTask, linear_probe
from .retrieval import RetrievalTask, retrieval_metrics
from .segmentation import ConfusionMatrix, SegmentationTask, Segmenter
from .zeroshot import ZeroShotTask, classification_metrics

__all__ = [
    "Conditioning",
    "ConfusionMatrix",
    "DEMO_TASKS",
    "EvalDataError",
    "LinearProbeTask",
    "RetrievalTask",
    "SegmentationTask",
    "Segmenter",
    "TASKS",
    "TASK_NAMES",
    "TRAIN_EVAL_TASKS",
    "TaskSpec",
    "ZeroShotTask",
    "classification_metrics",
    "build_tasks",
    "evaluate",
    "linear_probe",
    "parse_tasks",
    "retrieval_metrics",
]

TaskSpec = ZeroShotTask | RetrievalTask | SegmentationTask | LinearProbeTask
TASKS: dict[str, type] = {
    "zeroshot": ZeroShotTask,
    "retrieval": RetrievalTask,
    "segmentation": SegmentationTask,
    "linear_probe": LinearProbeTask,
}
# Every task name build_tasks knows ("long_retrieval" is retrieval with the long captions), and
# the defaults: all but long_retrieval for `dreamlip eval`; without the linear probe (it fits a
# classifier each time) for evaluation during training.
TASK_NAMES = ("zeroshot", "retrieval", "long_retrieval", "segmentation", "linear_probe")
DEMO_TASKS = ("zeroshot", "retrieval", "segmentation", "linear_probe")
TRAIN_EVAL_TASKS = ("zeroshot", "retrieval", "segmentation")


def build_tasks(
    data: str | Path, tasks: Sequence[str] = DEMO_TASKS, *, long_text: str = "truncate", **options: Any
) -> list[TaskSpec]:
    """Tasks that all read one dataset, ``data``; for the embedded dataset's directory the
    defaults give shape classification, retrieval with the held-out human captions, shape
    segmentation (background scored by its prompt) and a linear probe (train -> test).
    ``"long_retrieval"`` is retrieval with each image's long captions (every captioner's, from our
    JSONL records) as its texts. ``long_text`` is the policy of both retrieval tasks; ``options``
    go to every task with such a field (``threshold=0.5`` to segmentation, ``max_train=1000`` to
    the linear probe, ``classes=FILE`` to all that take one); one no task takes is an error."""
    specs: list[TaskSpec] = []
    unused = set(options)
    for task in tasks:
        if task == "long_retrieval":
            cls, preset = RetrievalTask, {"texts": "long", "long_text": long_text, "name": "long_retrieval"}
        elif task in TASKS:
            cls, preset = TASKS[task], ({"long_text": long_text} if task == "retrieval" else {})
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {list(TASK_NAMES)}")
        accepted = {f.name for f in dataclasses.fields(cls) if f.init}
        mine = {k: v for k, v in options.items() if k in accepted}
        unused -= mine.keys()
        specs.append(cls(data, **{**preset, **mine}))
    if unused:
        raise ValueError(f"no task among {list(tasks)} takes option(s) {sorted(unused)}")
    return specs


def parse_tasks(tasks: TaskSpec | Mapping | Sequence[TaskSpec | Mapping]) -> list[TaskSpec]:
    """Task objects from task objects or ``{"task": NAME, "data": PATH, ...}`` dicts."""
    items = [tasks] if isinstance(tasks, (Mapping, *TASKS.values())) else list(tasks)
    specs = []
    for item in items:
        if isinstance(item, Mapping):
            fields = dict(item)
            kind = fields.pop("task", None)
            if kind not in TASKS:
                raise ValueError(f"task entry {dict(item)!r}: 'task' must be one of {list(TASKS)}")
            try:
                item = TASKS[kind](**fields)
            except TypeError as err:
                raise ValueError(f"task entry {dict(item)!r}: {err}") from None
        elif not isinstance(item, tuple(TASKS.values())):
            raise TypeError(f"not a task: {item!r}")
        specs.append(item)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique (they prefix the metrics): {names}")
    return specs


def _as_dreamlip(model: Any) -> Any:
    """A bare open_clip model gets DreamLIPModel's interface (patch tokens, normalised outputs)."""
    from dreamlip.model import DreamLIPModel, load_open_clip

    open_clip = load_open_clip()
    if isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
        return DreamLIPModel(model)
    return model


def evaluate(
    model: Any,
    tokenizer: Any,
    transform: Any,
    tasks: TaskSpec | Mapping | Sequence[TaskSpec | Mapping],
    device: str | torch.device | None = None,
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
    conditioning: Conditioning | None = None,
) -> dict[str, float]:
    """Run the tasks and return ``{"<task name>/<metric>": value}``.

    ``model`` is a DreamLIPModel (or an open_clip CLIP), ``transform`` its eval image transform.
    ``device`` defaults to the model's; the model is put in eval mode for the call and its
    training mode restored after, so this can run mid-training. With ``conditioning`` (a
    text-conditioned pooler, FLAIR's), zero-shot and retrieval also report ``conditioned_<metric>``:
    the same metrics by text-conditioned image embeddings (:mod:`dreamlip.eval.conditioned`).
    """
    specs = parse_tasks(tasks)
    model = _as_dreamlip(model)
    if device is None:
        device = next(model.parameters()).device
    ctx = EvalContext(model, tokenizer, transform, torch.device(device), batch_size, workers, progress, conditioning)
    was_training = model.training
    model.eval()
    try:
        results: dict[str, float] = {}
        with torch.no_grad():
            for spec in specs:
                results.update({f"{spec.name}/{k}": v for k, v in spec.run(ctx).items()})
        return results
    finally:
        model.train(was_training)
