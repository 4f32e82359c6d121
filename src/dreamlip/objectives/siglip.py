"""SigLIP's objective (Zhai et al. 2023, arXiv 2303.15343) with DreamLIP's texts: the pairwise
sigmoid loss over the global batch, every text of an image (raw caption and K sub-captions) a
positive for it (docs/method.md, "SigLIP")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dreamlip.losses import gather_with_grad, multi_positive_sigmoid_loss, sigmoid_bias_start

from .base import ModelNeeds, Objective, Outputs, register

__all__ = ["SigLIPObjective"]


@register
class SigLIPObjective(Objective):
    """The multi-positive sigmoid loss (:func:`dreamlip.losses.multi_positive_sigmoid_loss`), term
    ``sigmoid``, with open_clip's ``SigLipLoss`` semantics: a learnable scale (the model's
    temperature ``clip.logit_scale``, starting at ``log(sigmoid_scale_init)``, SigLIP's log 10 in a
    run from scratch) and a learnable bias (this objective's ``logit_bias``), starting where
    ``sigmoid_bias_init`` says: by default at the batch's prior log-odds of a match
    (:func:`sigmoid_bias_start`; SigLIP's -10 at its batch of 32k).

    Under DDP every rank scores its own images against the texts of every rank, gathered with
    their gradients (one all_gather, :func:`gather_with_grad`, as the contrastive objective gathers
    them), so the negatives are the global batch's and the mean of the ranks' terms is the
    one-process loss.
    """

    name = "siglip"

    @dataclass
    class Config:
        sigmoid_scale_init: float = 10.0  # the sigmoid's starting scale t = exp(t'): SigLIP's 10
        # its starting bias: auto is -log(global batch - 1), the prior log-odds of a match (SigLIP's -10 at 32k)
        sigmoid_bias_init: Literal["auto"] | float = "auto"

    def __init__(self, sigmoid_scale_init: float = 10.0, sigmoid_bias_init: float = -10.0, text_slots: int | None = None):
        super().__init__()
        self.model_logit_scale_init = math.log(sigmoid_scale_init)
        self.logit_bias = nn.Parameter(torch.tensor(float(sigmoid_bias_init)))
        self.needs = ModelNeeds()

    @classmethod
    def from_config(cls, config, text_slots: int, embed_dim: int, global_batch: int | None = None) -> SigLIPObjective:
        return cls(config.sigmoid_scale_init, sigmoid_bias_start(config.sigmoid_bias_init, global_batch), text_slots)

    def forward(self, outputs: Outputs, step: int = 0) -> dict[str, torch.Tensor]:
        all_texts, rows = gather_with_grad(outputs["text_emb"])
        return {"sigmoid": multi_positive_sigmoid_loss(outputs["image_emb"], all_texts, outputs["logit_scale"], self.logit_bias, rows)}

    def scalars(self) -> dict[str, float]:
        return {"logit_bias": float(self.logit_bias.detach())}

    def open_clip_state(self) -> dict[str, torch.Tensor]:
        return {"logit_bias": self.logit_bias.detach()}
