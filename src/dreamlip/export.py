"""Export to open_clip's ``local-dir:`` layout.

``dreamlip export --checkpoint CKPT --out DIR`` writes::

    DIR/open_clip_config.json          {"model_cfg": <the architecture>, "preprocess_cfg": {mean, std, ...}}
    DIR/open_clip_model.safetensors    the open_clip model's state dict (the checkpoint's "clip.*")

which ``open_clip.create_model_and_transforms("local-dir:DIR")`` and
``open_clip.get_tokenizer("local-dir:DIR")`` load without this package: the architecture config
is embedded in full (ours live in dreamlip/model_configs, unknown to a plain open_clip), with the
text context the model has (``model.context_length=248`` exports a 248-token model and tokenizer).
Of the objective's parameters, those open_clip's model has a place for go with it (SigLIP's
``logit_bias``, :meth:`Objective.open_clip_state`); the rest (DreamLIP's grouping temperature)
are training-only and are not exported.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dreamlip.model import DreamLIPModel, load_open_clip
from dreamlip.objectives import Objective

__all__ = ["export_open_clip"]


def export_open_clip(
    model: DreamLIPModel | torch.nn.Module, model_name: str, out_dir: str | os.PathLike, objective: Objective | None = None
) -> Path:
    """Write ``model`` (a DreamLIPModel or a bare open_clip model of architecture ``model_name``)
    as an open_clip ``local-dir:`` directory, with the entries ``objective`` defines in open_clip's
    model (a parameter open_clip builds only when asked, such as ``logit_bias``, is asked for in
    the config as ``init_<name>``); returns the directory."""
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
    state = clip.state_dict()
    for name, tensor in (objective.open_clip_state() if objective is not None else {}).items():
        if name not in state:
            model_cfg[f"init_{name}"] = float(tensor)
        state[name] = tensor
    # safetensors refuses views of shared storage; contiguous copies are plain tensors.
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / HF_SAFE_WEIGHTS_NAME), metadata={"format": "pt", "model_name": model_name})
    # open_clip's own writer of open_clip_config.json (the one its hub upload uses).
    save_config_for_hf(clip, out / HF_CONFIG_NAME, model_config=model_cfg)
    return out
