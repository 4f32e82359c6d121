"""Linear probe: logistic regression on frozen global image embeddings (the CLIP paper's protocol).

The dataset's own train/test split is used. The L2 strength is fixed with ``C``, or, when ``C`` is
None, chosen from ``c_grid`` on a stratified 20 % validation split of the training set and the
classifier refitted on the whole training set (CLIP sweeps C on a validation split likewise).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import ClassificationSet, read_linear_probe
from .encode import EvalContext, encode_images
from .zeroshot import classification_metrics

__all__ = ["LinearProbeTask", "linear_probe"]

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, y)


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    C: float | None = None,
    c_grid: Sequence[float] = C_GRID,
    seed: int = 0,
) -> dict[str, float]:
    """Fit on train, score on test: top-1 / top-5 / mean per-class accuracy (percent) and C."""
    from sklearn.model_selection import train_test_split

    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe's training set must hold at least two classes")
    if C is None:
        try:
            split = train_test_split(train_x, train_y, test_size=0.2, random_state=seed, stratify=train_y)
        except ValueError:  # a class too rare to stratify: a plain random split
            split = train_test_split(train_x, train_y, test_size=0.2, random_state=seed)
        fit_x, val_x, fit_y, val_y = split
        C = max(c_grid, key=lambda c: _fit(fit_x, fit_y, c, seed).score(val_x, val_y))
    model = _fit(train_x, train_y, C, seed)
    # Scores over every class of the dataset, so top-k and labels absent from train line up.
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    logits = np.full((len(test_x), n_classes), -np.inf)
    scores = model.decision_function(test_x)
    if scores.ndim == 1:  # binary: one score, for classes_[1] against classes_[0]
        scores = np.stack([np.zeros_like(scores), scores], axis=1)
    logits[:, model.classes_] = scores
    metrics = classification_metrics(torch.from_numpy(logits), torch.from_numpy(test_y))
    return {**metrics, "C": float(C)}


@dataclass
class LinearProbeTask:
    """Linear probe on ``data``'s test split, trained on ``train`` (default: its train split)."""

    data: str | Path
    train: str | Path | None = None
    classes: str | Sequence[str] | None = None
    split: str = "test"
    train_split: str = "train"
    C: float | None = None
    max_train: int | None = None  # use only the first N training images (faster in-training evals)
    seed: int = 0
    name: str = "linear_probe"
    _datasets: tuple[ClassificationSet, ClassificationSet] | None = field(
        default=None, init=False, repr=False
    )

    @property
    def datasets(self) -> tuple[ClassificationSet, ClassificationSet]:
        if self._datasets is None:
            self._datasets = read_linear_probe(
                self.data,
                train=self.train,
                classes=self.classes,
                split=self.split,
                train_split=self.train_split,
            )
        return self._datasets

    def run(self, ctx: EvalContext) -> dict[str, float]:
        train, test = self.datasets
        n_train = len(train.images) if self.max_train is None else min(self.max_train, len(train.images))
        train_x = encode_images(ctx, train.images[:n_train], desc=f"{self.name} train").numpy()
        test_x = encode_images(ctx, test.images, desc=f"{self.name} test").numpy()
        metrics = linear_probe(
            train_x,
            np.asarray(train.labels[:n_train]),
            test_x,
            np.asarray(test.labels),
            C=self.C,
            seed=self.seed,
        )
        return {**metrics, "n_train": float(n_train), "n_test": float(len(test.images))}

    def describe(self) -> dict[str, Any]:
        train, test = self.datasets
        return {
            "task": "linear_probe",
            "name": self.name,
            "train": train.source,
            "test": test.source,
            "classes": test.classnames,
            "C": self.C if self.C is not None else f"chosen from {list(C_GRID)} on 20% of train",
            "max_train": self.max_train,
            "seed": self.seed,
        }
