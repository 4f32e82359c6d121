"""Export to open_clip's ``local-dir:`` layout, and load open_clip weights as a starting point.

``dreamlip export --checkpoint CKPT --out DIR`` writes::

    DIR/open_clip_config.json          {"model_cfg": <the architecture>, "preprocess_cfg": {mean, std, ...}}
    DIR/open_clip_model.safetensors    the open_clip model's state dict (the checkpoint's "clip.*")

which ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` load without this package: the architecture config
is embedded in full (ours live in dreamlip/model_configs, unknown to a plain open_clip), with the
text context the model has (``model.context_length=248`` exports a 248-token model and tokenizer).
The grouping loss's ``local_logit_scale`` is a training-only parameter and is not exported.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from dreamlip.model import DreamLIPModel, create_model, load_open_clip, saved_context_length, with_context_length

__all__ = [
    "NotPlainWeights",
    "PretrainedMismatch",
    "export_open_clip",
    "load_pretrained",
]


class PretrainedMismatch(ValueError):
    """Pretrained weights that do not fit the architecture they are loaded into."""


class NotPlainWeights(ValueError):
    """A pretrained file that ``torch.load(weights_only=True)`` refuses: it pickles Python objects."""

    def __init__(self, path: str, err: pickle.UnpicklingError):
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        holding = f" (it pickles {found.group(1)})" if found else ""
        super().__init__(
            f"{path}: not a plain weights file{holding}; it is loaded with weights_only=True, which "
            "accepts only tensors and plain containers. Save just the state dict "
            "(torch.save(model.state_dict(), path)) or convert it to .safetensors."
        )


def export_open_clip(
    model: DreamLIPModel | torch.nn.Module, model_name: str, out_dir: str | os.PathLike
) -> Path:
    """Write ``model`` (a DreamLIPModel or a bare open_clip model of architecture ``model_name``)
    as an open_clip ``local-dir:`` directory; returns the directory."""
    open_clip = load_open_clip()  # with dreamlip's model configs, which get_model_config reads
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    clip = model.clip if isinstance(model, DreamLIPModel) else model
    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"unknown architecture {model_name!r}: neither open_clip's nor dreamlip's")
    # A longer context than the architecture's (trained or stretched) loads as it was trained.
    model_cfg["text_cfg"]["context_length"] = clip.context_length
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        # local-dir: makes open_clip read an HF tokenizer from the directory itself.
        raise ValueError(f"{model_name} uses a Hugging Face tokenizer; exporting it is not supported")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views of shared storage; contiguous copies are plain tensors.
    tensors = {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}
    save_file(tensors, str(out / HF_SAFE_WEIGHTS_NAME), metadata={"format": "pt", "model_name": model_name})
    # open_clip's own writer of open_clip_config.json (the one its hub upload uses).
    save_config_for_hf(clip, out / HF_CONFIG_NAME, model_config=model_cfg)
    return out


def _mismatch(model: DreamLIPModel, path: str) -> str | None:
    """What differs between a weights file and the architecture, or None if nothing does."""
    from open_clip.factory import load_state_dict

    state = load_state_dict(path)
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


def load_pretrained(
    model_name: str,
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    context_length: int | None = None,
    stretch_positions: bool = False,
    **kwargs: Any,
):
    """``create_model(model_name, pretrained=path)`` with a clear error when the file's weights
    are for another architecture. ``path`` is an open_clip checkpoint (``.pt``/``.bin``/
    ``.safetensors``, as open_clip reads them) or a dreamlip checkpoint (its ``clip.*`` weights;
    it must be of the same architecture). A longer ``context_length`` than the weights have
    needs ``stretch_positions`` (see :func:`dreamlip.model.create_model`).
    Returns ``(model, train_transform, eval_transform)``."""
    from dreamlip.checkpoint import NotADreamLIPCheckpoint, load_checkpoint

    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such pretrained weights file")
    try:
        payload = load_checkpoint(path)
    except NotADreamLIPCheckpoint:
        payload = None
    if payload is not None:
        if payload.get("model_name") != model_name:
            raise PretrainedMismatch(
                f"{path} is a dreamlip checkpoint of {payload.get('model_name')!r}, not {model_name!r}"
            )
        # built at the checkpoint's own context, then stretched like open_clip weights
        model, train_transform, eval_transform = create_model(
            model_name, device=device, context_length=saved_context_length(payload), **kwargs
        )
        clip_state = {k[len("clip.") :]: v for k, v in payload["model"].items() if k.startswith("clip.")}
        model.clip.load_state_dict(clip_state)
        if context_length is not None and context_length != model.context_length:
            if not stretch_positions:
                raise PretrainedMismatch(
                    f"{path} has {model.context_length} text positions, context_length is {context_length}: "
                    "set stretch_positions=true (model.stretch_positions) to stretch them"
                )
            model = DreamLIPModel(with_context_length(model.clip, model_name, context_length, device=device, **kwargs))
        return model, train_transform, eval_transform
    try:
        return create_model(
            model_name,
            pretrained=path,
            device=device,
            context_length=context_length,
            stretch_positions=stretch_positions,
            **kwargs,
        )
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a pickled object
        raise NotPlainWeights(path, err) from None
    except (RuntimeError, AssertionError, KeyError) as err:  # what open_clip's loading raises on a misfit
        # open_clip converts some legitimate differences (resized position embeddings), so the
        # file is compared with the architecture only once loading has failed.
        model, _, _ = create_model(model_name, device="cpu", **kwargs)
        problem = _mismatch(model, path)
        if problem is None:
            raise
        raise PretrainedMismatch(
            f"{path} does not fit architecture {model_name!r}: {problem}. "
            "Is it a checkpoint of another model?"
        ) from err


# ---------------------------------------------------------------------------------------------
# CLI: dreamlip export
