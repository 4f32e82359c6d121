"""Checkpoint files: the format, atomic writes, ``weights_only=True`` reads, a run's step
checkpoints (:class:`Checkpointer`) and its position (:class:`TrainState`). A model is rebuilt
from one by :func:`dreamlip.loading.load_model`.

A checkpoint is one ``torch.save``d dict of tensors and plain Python values (so it loads with
``weights_only=True``)::

    {"format": "dreamlip-checkpoint", "version": 3,
     "model_name": "ViT-B-16",          # the open_clip architecture
     "model": DreamLIPModel.state_dict(),  # "clip.*" is a plain open_clip state dict
     "objective": Objective.state_dict(),  # its parameters (temperatures, biases, poolers); config["loss"] says which
     "config": {...},                   # the run's config as plain data
     "step": int,                       # optimizer steps the weights have had
     # step checkpoints only (checkpoints/step_*.pt), what an exact resume needs:
     "optimizer": {...},                # keyed by the names of train.TrainModule's parameters ("model.*", "objective.*")
     "scheduler": {...}, "scaler": {...},
     "train_state": TrainState.state_dict()}  # data position, skip counts, RNG states

Older files are read as version 3: version 1 (``position``, ``skips`` and ``rng`` at the top, no
``step``) and version 2 (the DreamLIP objective's grouping temperature in ``model`` as
``local_logit_scale``, the optimizer keyed by the model's parameter names). Weights holding NaN or
infinity are neither written nor read: a diverged model is refused by name.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreamlip.io import atomic_write

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Checkpointer",
    "NotADreamLIPCheckpoint",
    "TrainState",
    "load_checkpoint",
    "model_payload",
    "non_finite_weight",
    "save_checkpoint",
    "split_weights",
]

CHECKPOINT_FORMAT = "dreamlip-checkpoint"
CHECKPOINT_VERSION = 3


class NotADreamLIPCheckpoint(ValueError):
    """The file is missing, unreadable, or not a checkpoint this package wrote."""


def non_finite_weight(weights: dict[str, Any]) -> str | None:
    """The name of the first floating-point tensor in ``weights`` holding NaN or infinity, or None."""
    for name, tensor in weights.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically (:func:`dreamlip.io.atomic_write`): a reader sees
    the old file or the new, never half. Non-finite weights are refused (ValueError) before the
    file is touched, so a diverged model never replaces a good checkpoint."""
    bad = non_finite_weight(payload.get("model", {}))
    if bad is not None:
        raise ValueError(f"refusing to write {path}: weight {bad} is not finite (the model diverged)")
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    return atomic_write(path, lambda handle: torch.save(payload, handle), binary=True)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a clear error for anything that is not ours."""
    path = Path(path)
    if not path.is_file():
        raise NotADreamLIPCheckpoint(f"{path}: no such checkpoint file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for foreign or corrupt files
        raise NotADreamLIPCheckpoint(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise NotADreamLIPCheckpoint(
            f"{path}: not a dreamlip checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry). "
            "To start from an open_clip checkpoint, pass it as the model's pretrained weights instead."
        )
    if payload.get("version", 0) > CHECKPOINT_VERSION:
        raise NotADreamLIPCheckpoint(f"{path}: written by a newer dreamlip (version {payload['version']})")
    bad = non_finite_weight(payload.get("model") or {})
    if bad is not None:
        raise NotADreamLIPCheckpoint(
            f"{path}: weight {bad} holds NaN or infinity: the run that wrote it diverged; use an earlier checkpoint"
        )
    return _upgrade(payload)


def _upgrade(payload: dict[str, Any]) -> dict[str, Any]:
    """An older payload in the version 3 layout."""
    version = payload.get("version", 1)
    if version >= 3:
        return payload
    payload = dict(payload, version=3)
    if version == 1:
        if "position" in payload:
            position = payload.pop("position")
            payload["train_state"] = {**position, "skips": payload.pop("skips", {}), "rng": payload.pop("rng", None)}
            payload["step"] = position["step"]
        payload.setdefault("step", None)  # a version 1 model.pt did not say
    # Up to version 2 the only objective was DreamLIP's, its grouping temperature a model parameter.
    model = dict(payload["model"])
    payload["objective"] = {"local_logit_scale": model.pop("local_logit_scale")} if "local_logit_scale" in model else {}
    payload["model"] = model
    if "optimizer" in payload:
        payload["optimizer"] = _prefix_parameter_names(payload["optimizer"])
    return payload


def _prefix_parameter_names(optimizer: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by the model's parameter names, keyed as train.TrainModule names them."""

    def renamed(name: str) -> str:
        return f"objective.{name}" if name == "local_logit_scale" else f"model.{name}"

    return {
        "state": {renamed(name): state for name, state in optimizer["state"].items()},
        "param_groups": [{**group, "params": [renamed(name) for name in group["params"]]} for group in optimizer["param_groups"]],
    }


def model_payload(
    model_name: str, model: dict[str, torch.Tensor], objective: dict[str, torch.Tensor], config: dict[str, Any], step: int
) -> dict[str, Any]:
    """The fields every checkpoint has (``model.pt`` has only these)."""
    return {"model_name": model_name, "model": model, "objective": objective, "config": config, "step": step}


def split_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """train.TrainModule's state dict as the model's and the objective's."""
    parts: dict[str, dict[str, torch.Tensor]] = {"model": {}, "objective": {}}
    for name, tensor in weights.items():
        part, _, rest = name.partition(".")
        parts[part][rest] = tensor
    return parts["model"], parts["objective"]


@dataclass
class TrainState:
    """Where a run is: what a resume needs besides weights, optimizer, scheduler and scaler."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch consumed on each rank
    # stream mode: per rank, the records each reader had drawn (see TrainLoader.set_epoch)
    records_read: list[list[int]] | None = None
    skips: Counter = field(default_factory=Counter)  # bad samples skipped, by reason
    skipped_steps: int = 0  # updates dropped for a non-finite loss or gradient (optim.on_nonfinite=skip)

    def state_dict(self, device: torch.device) -> dict[str, Any]:
        """The position and skip counts, and this process's RNG states as they are now."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "records_read": self.records_read,
            "skips": dict(self.skips),
            "skipped_steps": self.skipped_steps,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore the position, the skip counts and the RNG states ``state_dict`` saved."""
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.records_read = state["records_read"]
        self.skips = Counter(state["skips"])
        self.skipped_steps = state.get("skipped_steps", 0)  # absent from checkpoints of older versions
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)


class Checkpointer:
    """A run's step checkpoints, ``DIRECTORY/step_00001000.pt``, the newest ``keep`` of them."""

    def __init__(self, directory: str | os.PathLike, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}.pt"

    def remove_stale(self) -> list[Path]:
        """Delete what saves killed midway left: hidden temporary files of step checkpoints (a
        complete checkpoint never starts with "."). Call it before saving starts."""
        stale = sorted(self.directory.glob(".step_*")) if self.directory.is_dir() else []
        for path in stale:
            path.unlink(missing_ok=True)
        return stale

    def latest(self) -> Path | None:
        """The newest complete step checkpoint, or None."""
        candidates = sorted(self.directory.glob("step_*.pt"))
        return candidates[-1] if candidates else None

    def resolve(self, resume: str) -> Path | None:
        """``--resume``'s argument as a file: ``latest`` (None when there is none yet) or a path."""
        return self.latest() if resume == "latest" else Path(resume)

    def save(
        self,
        payload: dict[str, Any],
        *,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        scaler: dict[str, Any],
        train_state: dict[str, Any],
    ) -> Path:
        """Write the step checkpoint of ``model_payload(...)`` plus the training state, atomically,
        then :meth:`prune`."""
        path = save_checkpoint(
            self.path(payload["step"]),
            {**payload, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "train_state": train_state},
        )
        self.prune()
        return path

    def prune(self) -> None:
        """Delete all but the newest ``keep`` step checkpoints."""
        for old in sorted(self.directory.glob("step_*.pt"))[: -self.keep]:
            old.unlink()

    @staticmethod
    def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """A step checkpoint to resume from; a weights-only file (``model.pt``) is refused."""
        payload = load_checkpoint(path, map_location=map_location)
        if "train_state" not in payload:
            raise NotADreamLIPCheckpoint(
                f"{path}: holds weights only, not a run's training state, so it cannot be resumed; "
                "to start a new run from these weights, pass --set model.pretrained=" + str(path)
            )
        return payload
