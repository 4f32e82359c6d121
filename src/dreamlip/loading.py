"""The one way to load a model: a dreamlip checkpoint, a ``dreamlip export`` directory, open_clip
weights or a bare architecture, to the model, its tokenizer, transforms and what it is.

``dreamlip eval``, ``dreamlip serve``, ``dreamlip export``, fine-tuning (``model.pretrained``), the
demo and the benches all load through :func:`load_model`::

    loaded = load_model("runs/b16/model.pt")                        # a checkpoint (model.pt or a step's)
    loaded = load_model("exported/")                                # a dreamlip export (open_clip's local-dir:)
    loaded = load_model("openai_vit_b16.bin", model_name="ViT-B-16")   # open_clip weights
    loaded = load_model(model_name="ViT-B-16")                      # the architecture, randomly initialised
    loaded.model, loaded.tokenizer, loaded.eval_transform, loaded.info, loaded.objective

A checkpoint also gives the objective it was trained with (``loaded.objective``, its trained
parameters loaded), for what only the objective holds: a text-conditioned pooler, SigLIP's bias.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreamlip.model import DreamLIPModel, create_model, get_tokenizer, load_open_clip, saved_context_length, with_context_length
from dreamlip.objectives import Objective

__all__ = ["LoadedModel", "NotPlainWeights", "PretrainedMismatch", "load_model"]


class PretrainedMismatch(ValueError):
    """Weights that do not fit the architecture they are loaded into."""


class NotPlainWeights(ValueError):
    """A weights file that ``torch.load(weights_only=True)`` refuses: it pickles Python objects."""

    def __init__(self, path: str, err: pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        holding = f" (it pickles {found.group(1)})" if found else ""
        super().__init__(
            f"{path}: not a plain weights file{holding}; it is loaded with weights_only=True, which "
            "accepts only tensors and plain containers. Save just the state dict "
            "(torch.save(model.state_dict(), path)) or convert it to .safetensors."
        )


@dataclass
class LoadedModel:
    model: DreamLIPModel  # in eval mode
    tokenizer: Any
    train_transform: Any
    eval_transform: Any
    # what was loaded: "kind" (checkpoint, export, open_clip or architecture), "path", "model_name",
    # and for a checkpoint its "step" and "objective"
    info: dict[str, Any] = field(default_factory=dict)
    objective: Objective | None = None  # a checkpoint's objective, its trained parameters loaded
    config: dict[str, Any] | None = None  # a checkpoint's training config


def load_model(
    source: str | os.PathLike | None = None,
    *,
    model_name: str | None = None,
    device: str | torch.device = "cpu",
    context_length: int | None = None,
    stretch_positions: bool = False,
) -> LoadedModel:
    """Load ``source``: a dreamlip checkpoint file, a directory written by ``dreamlip export``, an
    open_clip weights file (``.pt``/``.bin``/``.safetensors``, for architecture ``model_name``) or,
    with no source, architecture ``model_name`` randomly initialised.

    ``model_name``, when given with a checkpoint or an export, must be theirs (a clear error
    otherwise). ``context_length`` longer than the weights' needs ``stretch_positions``: Long-CLIP's
    stretch (:func:`dreamlip.model.create_model`).
    """
    if source is None:
        if model_name is None:
            raise ValueError("load_model needs a source or a model_name")
        model, train_transform, eval_transform = create_model(model_name, device=device, context_length=context_length)
        return _loaded(model, model_name, train_transform, eval_transform, {"kind": "architecture", "path": None})
    path = Path(source)
    if path.is_dir():
        return _load_export(path, model_name, device, context_length, stretch_positions)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint, export directory or weights file")
    from dreamlip.checkpoint import NotADreamLIPCheckpoint, load_checkpoint

    try:
        payload = load_checkpoint(path)
    except NotADreamLIPCheckpoint:
        if model_name is None:
            raise
        return _load_open_clip_weights(path, model_name, device, context_length, stretch_positions)
    return _load_checkpoint(path, payload, model_name, device, context_length, stretch_positions)


def _loaded(model, model_name, train_transform, eval_transform, info, **extra) -> LoadedModel:
    tokenizer = get_tokenizer(model_name, model.context_length)
    return LoadedModel(model.eval(), tokenizer, train_transform, eval_transform, {**info, "model_name": model_name}, **extra)


def _load_checkpoint(path: Path, payload: dict[str, Any], model_name, device, context_length, stretch_positions) -> LoadedModel:
    saved_name = payload["model_name"]
    if model_name is not None and saved_name != model_name:
        raise PretrainedMismatch(f"{path} is a dreamlip checkpoint of {saved_name!r}, not {model_name!r}")
    from dreamlip.checkpoint import NotADreamLIPCheckpoint

    # built at the checkpoint's own context, then stretched like open_clip weights
    try:
        model, train_transform, eval_transform = create_model(saved_name, device=device, context_length=saved_context_length(payload))
    except RuntimeError:  # open_clip: no such model config
        raise NotADreamLIPCheckpoint(f"{path}: its model name {saved_name!r} is no architecture open_clip or dreamlip knows") from None
    mismatch = _state_dict_mismatch(model.state_dict(), payload["model"])
    if mismatch:
        raise NotADreamLIPCheckpoint(f"{path}: its weights do not fit its model name {saved_name!r}: {mismatch}")
    model.load_state_dict(payload["model"])
    model = _stretched(model, saved_name, path, device, context_length, stretch_positions)
    objective = _objective(payload, model.embed_dim, device) if "objective" in payload else None
    info = {"kind": "checkpoint", "path": str(path.resolve()), "step": payload.get("step"),
            "objective": objective.name if objective is not None else None}
    return _loaded(model, saved_name, train_transform, eval_transform, info, objective=objective, config=payload.get("config"))


def _state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """How ``found`` differs from ``expected`` in names and shapes, in one line ("" if it fits)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and expected[k].shape != found[k].shape]
    parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
    if reshaped:
        first = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (e.g. {first}: {list(found[first].shape)} in the file, "
                     f"{list(expected[first].shape)} in the architecture)")
    return ", ".join(parts)


def _objective(payload: dict[str, Any], embed_dim: int, device) -> Objective:
    """The objective a checkpoint was trained with, from its config's ``loss`` section."""
    from dreamlip.config import coerce_dataclass
    from dreamlip.objectives import LossConfig, build_objective

    config = payload.get("config") or {}
    loss = coerce_dataclass(LossConfig, config.get("loss") or {}, "the checkpoint's loss config")
    text_slots = (config.get("captions") or {}).get("k", 6) + 1
    objective = build_objective(loss, text_slots=text_slots, embed_dim=embed_dim).to(device)
    objective.load_state_dict(payload["objective"])
    return objective.eval()


def _stretched(model: DreamLIPModel, model_name: str, path: Path, device, context_length, stretch_positions) -> DreamLIPModel:
    if context_length is None or context_length == model.context_length:
        return model
    if not stretch_positions:
        raise PretrainedMismatch(
            f"{path} has {model.context_length} text positions, context_length is {context_length}: "
            "set stretch_positions=true (model.stretch_positions) to stretch them"
        )
    return DreamLIPModel(with_context_length(model.clip, model_name, context_length, device=device))


def _load_export(path: Path, model_name, device, context_length, stretch_positions) -> LoadedModel:
    """A ``dreamlip export`` directory (open_clip's ``local-dir:`` layout); its architecture name is
    in the weights file's metadata."""
    open_clip = load_open_clip()
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME

    if not (path / HF_CONFIG_NAME).is_file():
        raise ValueError(f"{path}: a directory, but not an open_clip export (no {HF_CONFIG_NAME})")
    saved_name = _export_model_name(path / HF_SAFE_WEIGHTS_NAME)
    if model_name is not None and saved_name is not None and saved_name != model_name:
        raise PretrainedMismatch(f"{path} is an export of {saved_name!r}, not {model_name!r}")
    clip, train_transform, eval_transform = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
    model = DreamLIPModel(clip).to(device)
    if context_length is not None and context_length != model.context_length:
        if saved_name is None:
            raise PretrainedMismatch(f"{path}: its architecture is not recorded, so its text positions cannot be stretched")
        model = _stretched(model, saved_name, path, device, context_length, stretch_positions)
    info = {"kind": "export", "path": str(path.resolve()), "model_name": saved_name}
    if context_length is None or context_length == clip.context_length:
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
    else:
        tokenizer = get_tokenizer(saved_name, model.context_length)
    return LoadedModel(model.eval(), tokenizer, train_transform, eval_transform, info)


def _export_model_name(weights: Path) -> str | None:
    """The architecture ``dreamlip export`` records in the safetensors metadata (None: not ours)."""
    from safetensors import safe_open

    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as handle:
        return (handle.metadata() or {}).get("model_name")


def _load_open_clip_weights(path: Path, model_name: str, device, context_length, stretch_positions) -> LoadedModel:
    """``create_model(model_name, pretrained=path)`` with a clear error when the file's weights are
    for another architecture."""
    info = {"kind": "open_clip", "path": str(path.resolve())}
    try:
        model, train_transform, eval_transform = create_model(
            model_name, pretrained=str(path), device=device, context_length=context_length, stretch_positions=stretch_positions
        )
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a pickled object
        raise NotPlainWeights(str(path), err) from None
    except (RuntimeError, AssertionError, KeyError) as err:  # what open_clip's loading raises on a misfit
        # open_clip converts some legitimate differences (resized position embeddings), so the
        # file is compared with the architecture only once loading has failed.
        problem = _mismatch(create_model(model_name, device="cpu")[0], path)
        if problem is None:
            raise
        raise PretrainedMismatch(
            f"{path} does not fit architecture {model_name!r}: {problem}. Is it a checkpoint of another model?"
        ) from err
    return _loaded(model, model_name, train_transform, eval_transform, info)


def _mismatch(model: DreamLIPModel, path: Path) -> str | None:
    """What differs between a weights file and the architecture, or None if nothing does."""
    from open_clip.factory import load_state_dict

    state = load_state_dict(str(path))
    own = model.clip.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(own.keys() & state.keys())
        if hasattr(state[k], "shape") and state[k].shape != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:3])})")
    return "; ".join(parts) or None
