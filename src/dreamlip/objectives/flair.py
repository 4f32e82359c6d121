"""FLAIR's objective (Xiao et al., CVPR 2025, arXiv 2412.03561): text-conditioned attention pooling
trained with the text-conditioned sigmoid loss, plus the multi-positive sigmoid loss between global
image embeddings and every caption (docs/method.md, "FLAIR")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from dreamlip.losses import (
    gather_with_grad, multi_positive_sigmoid_loss, one_text_of_every_other_image, sigmoid_bias_start, text_conditioned_sigmoid_loss,
)

from .base import ModelNeeds, Objective, Outputs, register

__all__ = ["FLAIRObjective", "TextConditionedPooler"]


class TextConditionedPooler(nn.Module):
    """FLAIR's attention pooling: each text's global embedding is the query over one image's patch
    tokens. Multi-head attention with a layer norm on the queries, the keys and the values, and a
    zero key and value appended (``add_zero_attn``), so a text that matches no patch can attend to
    nothing. ``forward(queries [B, Q, D], patches [B, N, D]) -> [B, Q, D]``: image b pooled by each
    of its Q texts."""

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        if dim % heads:
            raise ValueError(f"loss.flair_pool_heads={heads} does not divide the embedding width {dim}")
        self.ln_q, self.ln_k, self.ln_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_zero_attn=True)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.attn(self.ln_q(queries), self.ln_k(patches), self.ln_v(patches), need_weights=False)[0]


@register
class FLAIRObjective(Objective):
    """``flair_tcs_weight * L_tcs + flair_mps_weight * L_mps`` (FLAIR's: both 1/2), terms ``tcs`` and
    ``mps``, with the sigmoid's scale the model's temperature (FLAIR's start: CLIP's 1/0.07) and a
    learnable bias (this objective's ``logit_bias``), by default starting at the batch's prior
    log-odds of a match (:func:`~dreamlip.losses.sigmoid_bias_start`; FLAIR's -10 at its batch).

    ``L_tcs`` (:func:`text_conditioned_sigmoid_loss`): each image pooled by each of its own texts (positives)
    and by one text of every other image of the global batch (negatives, drawn afresh every step:
    the same draw on every rank and in every micro-batch's pass, from the step number); ``L_mps``
    (:func:`multi_positive_sigmoid_loss`): global image embeddings against every text of the global
    batch, an image's own texts positive. Texts are gathered from every rank with their gradients;
    patch tokens never leave their rank (each rank pools its own images).
    """

    name = "flair"

    @dataclass
    class Config:
        flair_tcs_weight: float = 0.5  # FLAIR's (tcs + mps) / 2
        flair_mps_weight: float = 0.5
        # the sigmoid's starting bias, shared by both terms: auto is -log(global batch - 1), the prior
        # log-odds of a match (FLAIR's code starts at SigLIP's -10); its scale starts at CLIP's 1/0.07
        flair_bias_init: Literal["auto"] | float = "auto"
        flair_pool_heads: int = 8  # the text-conditioned pooler's attention heads
        flair_pool_chunk: int = 0  # images pooled at a time in L_tcs, each chunk recomputed backward (0: all at once)

    def __init__(
        self,
        embed_dim: int,
        flair_tcs_weight: float = 0.5,
        flair_mps_weight: float = 0.5,
        flair_bias_init: float = -10.0,
        flair_pool_heads: int = 8,
        flair_pool_chunk: int = 0,
        text_slots: int | None = None,
    ):
        super().__init__()
        if flair_pool_chunk < 0:
            raise ValueError(f"loss.flair_pool_chunk must be 0 (all images at once) or more, got {flair_pool_chunk}")
        self.tcs_weight, self.mps_weight = flair_tcs_weight, flair_mps_weight
        self.pool_chunk = flair_pool_chunk
        self.pooler = TextConditionedPooler(embed_dim, flair_pool_heads)
        self.logit_bias = nn.Parameter(torch.tensor(float(flair_bias_init)))
        self.needs = ModelNeeds(patches=True)

    @classmethod
    def from_config(cls, config, text_slots: int, embed_dim: int, global_batch: int | None = None) -> FLAIRObjective:
        return cls(embed_dim, config.flair_tcs_weight, config.flair_mps_weight, sigmoid_bias_start(config.flair_bias_init, global_batch),
                   config.flair_pool_heads, config.flair_pool_chunk, text_slots)

    def forward(self, outputs: Outputs, step: int = 0) -> dict[str, torch.Tensor]:
        scale = outputs["logit_scale"]
        all_texts, rows = gather_with_grad(outputs["text_emb"])
        negatives = one_text_of_every_other_image(all_texts.shape[0], all_texts.shape[1], seed=step, device=all_texts.device)
        tcs = text_conditioned_sigmoid_loss(outputs["patch_emb"], all_texts, self.pooler, scale, self.logit_bias, negatives, rows,
                                            self.pool_chunk)
        mps = multi_positive_sigmoid_loss(outputs["image_emb"], all_texts, scale, self.logit_bias, rows)
        return {"tcs": self.tcs_weight * tcs, "mps": self.mps_weight * mps}

    def scalars(self) -> dict[str, float]:
        return {"logit_bias": float(self.logit_bias.detach())}

    def open_clip_state(self) -> dict[str, torch.Tensor]:
        return {"logit_bias": self.logit_bias.detach()}

    @property
    def conditioned_pooler(self) -> nn.Module:
        return self.pooler
