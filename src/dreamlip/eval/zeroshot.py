"""Zero-shot classification: class-prompt embeddings as a linear classifier over image embeddings.

Each class is embedded as the renormalised mean of its normalised prompt embeddings (CLIP's
prompt ensembling, as open_clip and clip_benchmark do); an image is assigned the class of highest
cosine similarity. Metrics (percent): ``top1``, ``top5`` (only with more than 5 classes: with 5 or
fewer it is 100 by definition), ``mean_per_class`` (top-1 recall averaged over the classes that
occur, i.e. balanced accuracy, clip_benchmark's ``mean_per_class_recall``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conditioned import conditioned_classification
from .datasets import ClassificationSet, Templates, read_classification, read_templates
from .encode import EvalContext, class_embeddings, encode_images

__all__ = ["ZeroShotTask", "classification_metrics", "resolve_templates"]


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1, top-5 (more than 5 classes only) and mean per-class accuracy, in percent."""
    labels = labels.long()
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit1 = ranked[:, 0] == labels
    metrics = {"top1": 100.0 * hit1.double().mean().item()}
    if logits.shape[1] > 5:
        metrics["top5"] = 100.0 * (ranked == labels[:, None]).any(dim=1).double().mean().item()
    present = labels.unique()
    per_class = torch.stack([hit1[labels == c].double().mean() for c in present])
    metrics["mean_per_class"] = 100.0 * per_class.mean().item()
    return metrics


def resolve_templates(option: str | Sequence[str] | None, dataset_templates: Templates | None) -> Templates:
    """Templates given explicitly win; else the dataset's own; else CLIP's 80 ImageNet ones."""
    if option is not None:
        return read_templates(option)
    if dataset_templates is not None:
        return dataset_templates
    return read_templates("imagenet")


@dataclass
class ZeroShotTask:
    """Zero-shot classification over ``data`` (see :func:`read_classification` for layouts)."""

    data: str | Path
    classes: str | Sequence[str] | None = None
    templates: str | Sequence[str] | None = None  # "imagenet", a file, or a list; default above
    split: str = "test"
    name: str = "zeroshot"
    _dataset: ClassificationSet | None = field(default=None, init=False, repr=False)

    @property
    def dataset(self) -> ClassificationSet:
        if self._dataset is None:  # read once: a task may run every N training steps
            self._dataset = read_classification(self.data, classes=self.classes, split=self.split)
        return self._dataset

    def run(self, ctx: EvalContext) -> dict[str, float]:
        data = self.dataset
        weights = class_embeddings(ctx, data.classnames, resolve_templates(self.templates, data.templates))
        images = encode_images(ctx, data.images, desc=self.name)
        metrics = classification_metrics(images @ weights.T, torch.tensor(data.labels))
        if ctx.conditioning is not None:
            logits = conditioned_classification(ctx, ctx.conditioning, data.images, weights, desc=f"{self.name} conditioned")
            metrics |= {f"conditioned_{key}": value for key, value in classification_metrics(logits, torch.tensor(data.labels)).items()}
        return {**metrics, "n_images": float(len(data.images)), "n_classes": float(len(data.classnames))}

    def describe(self) -> dict[str, Any]:
        data = self.dataset
        templates = resolve_templates(self.templates, data.templates)
        return {
            "task": "zeroshot",
            "name": self.name,
            "data": data.source,
            "classes": data.classnames,
            "templates": templates if isinstance(templates, list) else "class-specific",
        }
