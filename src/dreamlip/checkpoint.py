"""Checkpoint files: atomic writes, ``weights_only=True`` reads, and rebuilding the model from one.

A checkpoint is one ``torch.save``d dict of tensors and plain Python values (so it loads with
``weights_only=True``)::

    {"format": "dreamlip-checkpoint", "version": 1,
     "model_name": "ViT-B-16",          # the open_clip architecture
     "model": DreamLIPModel.state_dict(),  # "clip.*" is a plain open_clip state dict
     "config": {...},                   # the run's config as plain data
     "step": int, "epoch": int, ...}    # training state (optimizer, RNG, data position) if saved by train
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "NotADreamLIPCheckpoint", "load_checkpoint", "load_model", "save_checkpoint"]

CHECKPOINT_FORMAT = "dreamlip-checkpoint"
CHECKPOINT_VERSION = 1


class NotADreamLIPCheckpoint(ValueError):
    """The file is missing, unreadable, or not a checkpoint this package wrote."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a reader sees the old file or the new, never half.

    The bytes go to a temporary file in the same directory, are flushed to disk, and replace the
    target with ``os.replace`` (atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    return payload


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint holds. Returns ``(model, eval_transform, tokenizer, payload)``."""
    from dreamlip.model import create_model, get_tokenizer, saved_context_length

    payload = load_checkpoint(path)
    context_length = saved_context_length(payload)
    model, _, eval_transform = create_model(payload["model_name"], device=device, context_length=context_length)
    model.load_state_dict(payload["model"])
    return model.eval(), eval_transform, get_tokenizer(payload["model_name"], context_length), payload
