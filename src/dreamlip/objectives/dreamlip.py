"""DreamLIP's objective: ``w_global * L_mpcl + w_group * L_group`` (docs/method.md, "Objective").

``L_mpcl`` is the multi-positive contrastive loss over the global batch (with K = 0 exactly
open_clip's CLIP loss: the ``clip`` variant is this objective with K = 0); ``L_group`` groups each
sub-caption over patch tokens, with its own learnable temperature, which this objective owns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dreamlip.losses import (
    Negatives,
    cross_image_grouping_loss,
    gather_with_grad,
    group_patches,
    grouping_pairs,
    inverse_temperature,
    multi_positive_contrastive_loss,
    paired_infonce,
    token_grouping_loss,
)

from .base import ModelNeeds, Objective, Outputs, register

__all__ = ["DreamLIPObjective"]

GroupTemperature = Literal["local", "global"]
GroupSlots = Literal["subcaptions", "all"]
GroupGranularity = Literal["subcaption", "token"]


@register
class DreamLIPObjective(Objective):
    """``w_global * L_mpcl + w_group * L_group`` over the global batch; terms ``mpcl`` and ``group``.

    The grouping loss contrasts each sub-caption with other images (``group_negatives="cross"``,
    the default: each sub-caption grouped over their patches), with its own image's other sub-captions
    (``"image"``, the paper's) or with every sub-caption of the batch (``"batch"``). It runs on
    the sub-caption slots 1..K (``group_slots="subcaptions"``: slot 0, the raw alt-text, describes
    the whole image) or on every slot (``"all"``); with its own learnable temperature
    (``group_temperature="local"``, the parameter ``local_logit_scale``, starting at
    ``1 / group_temperature_init`` and kept at most ``1 / group_temperature_min``) or the model's
    (``"global"``); its gradient reaches both towers (``group_text_grad=True``, the paper's), the
    image tower only (``False``) or the texts by the share a number in (0, 1) gives, from
    ``group_text_grad_start`` of the run on and the patches only before it (the default: both
    towers from the run's half on, docs/method.md, "Grouping-loss default and why");
    with ``group_image_grad=False`` it reaches the text tower only, the image tower trained by the
    global term alone; with ``group_weights_grad=False`` it reaches the patches only through the
    pooled average, not through the similarities that choose the pooling weights. With ``group_granularity="token"``
    it groups each text token instead of each sub-caption (SPARC's, :func:`token_grouping_loss`;
    image negatives only). Its weight ramps linearly from 0 over ``group_warmup_steps`` or, when
    that is 0, over ``group_warmup_fraction`` of the run (:meth:`set_run_length`), and falls back
    to 0 over the run's last ``group_cooldown_fraction``. The
    ``cross`` negatives are each rank's own images (no patch token travels); with ``group_gather``
    texts and patches are gathered so they are the global batch's, as in one process, at
    ``O(B^2 K N)`` memory on every rank (``O(b B K N)`` with ``local_loss``). With ``local_loss``
    each rank computes only its own rows of the global logits (O(b * B) instead of O(B^2)); its
    terms are then that rank's share, whose mean over ranks is the global loss, and DDP's gradient
    averaging makes the update identical.

    ``text_slots`` (texts per image, K + 1) says whether the grouping term can run: it needs two
    grouped sub-captions per image (one text with token granularity); when it cannot, or its weight
    is 0, no patch tokens are asked for and the local temperature is frozen.
    """

    name = "dreamlip"
    needs_hint = "set loss.group_weight=0 to train without the grouping term"

    @dataclass
    class Config:
        global_weight: float = 1.0
        group_weight: float = 1.0  # the paper's; 0: off
        group_threshold: float | None = None  # None: 1/N
        group_negatives: Negatives = "cross"  # other images (docs/method.md); "image": the paper's
        group_temperature: GroupTemperature = "local"  # grouping's own learnable temperature, or the model's
        group_temperature_init: float = 0.07  # the local temperature's start (CLIP's for the global one)
        group_temperature_min: float = 0.01  # the local temperature's clamp (its inverse at most 100, as CLIP's)
        group_slots: GroupSlots = "subcaptions"  # group slots 1..K, or the raw caption too
        group_granularity: GroupGranularity = "subcaption"  # group each text, or each of its tokens (SPARC's)
        group_text_grad: bool | float = True  # true, the paper's: the grouping gradient trains the texts too; false: the patches only; a number: that share of it
        group_text_grad_start: float = 0.5  # ... from this fraction of the run on (the default: its second half; 0: from the start, the paper's), the patches only before (docs/method.md)
        group_image_grad: bool = True  # the paper's: the grouping gradient reaches the patches too; false: the texts only
        group_weights_grad: bool = True  # false: the pooling weights are constants to the grouping gradient
        group_projection_grad: bool = True  # false: the grouping gradient does not move the projection the class token shares
        group_gather: bool = False  # cross negatives from the global batch (patches travel); false: each rank's own images
        group_warmup_steps: int = 0  # the grouping weight ramps linearly from 0 over these steps
        group_warmup_fraction: float = 0.5  # ... or over this fraction of the run (the default: its first half; 0: the paper's constant weight), when the steps are 0
        group_cooldown_fraction: float = 0.0  # the grouping weight falls linearly to 0 over this last fraction of the run (0: none)
        group_text_adapter: bool = False  # the grouped sub-captions pass a linear map of the term's own (identity at start, decayed toward it)
        local_loss: bool = False  # each rank computes only its rows of the global logits

    def __init__(
        self,
        global_weight: float = 1.0,
        group_weight: float = 1.0,
        group_threshold: float | None = None,
        group_negatives: Negatives = "cross",
        group_temperature: GroupTemperature = "local",
        group_temperature_init: float = 0.07,
        group_temperature_min: float = 0.01,
        group_slots: GroupSlots = "subcaptions",
        group_granularity: GroupGranularity = "subcaption",
        group_text_grad: bool | float = True,
        group_text_grad_start: float = 0.5,
        group_image_grad: bool = True,
        group_weights_grad: bool = True,
        group_projection_grad: bool = True,
        group_gather: bool = False,
        group_warmup_steps: int = 0,
        group_warmup_fraction: float = 0.5,
        group_cooldown_fraction: float = 0.0,
        group_text_adapter: bool = False,
        local_loss: bool = False,
        text_slots: int | None = None,
        embed_dim: int | None = None,
    ):
        super().__init__()
        for name, value, allowed in (
            ("group_negatives", group_negatives, ("image", "batch", "cross")),
            ("group_temperature", group_temperature, ("local", "global")),
            ("group_slots", group_slots, ("subcaptions", "all")),
            ("group_granularity", group_granularity, ("subcaption", "token")),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if group_granularity == "token" and group_negatives != "image":
            raise ValueError(
                f"token-level grouping supports group_negatives=image (SPARC's), got group_negatives={group_negatives!r}"
            )
        if group_gather and (group_negatives != "cross" or group_granularity != "subcaption"):
            raise ValueError(
                "group_gather gathers the cross-image negatives: it needs group_negatives=cross and "
                f"group_granularity=subcaption, got {group_negatives!r} and {group_granularity!r}"
            )
        if not 0 <= float(group_text_grad) <= 1:
            raise ValueError(f"loss.group_text_grad is true, false or the share of the gradient, 0 to 1; got {group_text_grad}")
        if not (group_text_grad or group_image_grad):
            raise ValueError(
                "loss.group_text_grad and loss.group_image_grad are both false: the grouping term would train only its temperature"
            )
        for name, share in (
            ("group_warmup_fraction", group_warmup_fraction),
            ("group_cooldown_fraction", group_cooldown_fraction),
            ("group_text_grad_start", group_text_grad_start),
        ):
            if not 0 <= share <= 1:
                raise ValueError(f"loss.{name} is a share of the run, 0 to 1, got {share}")
        if group_text_adapter and (group_granularity != "subcaption" or embed_dim is None):
            raise ValueError(
                "loss.group_text_adapter maps each grouped sub-caption's embedding: it needs group_granularity=subcaption "
                f"and the embedding width (got {group_granularity!r}, embed_dim={embed_dim})"
            )
        if group_temperature_init < group_temperature_min:
            raise ValueError(
                f"loss.group_temperature_init {group_temperature_init} is below loss.group_temperature_min "
                f"{group_temperature_min}, its clamp"
            )
        self.global_weight = global_weight
        self.group_weight = group_weight
        self.group_threshold = group_threshold
        self.group_negatives = group_negatives
        self.group_temperature = group_temperature
        self.group_slots = group_slots
        self.group_granularity = group_granularity
        self.text_grad_share = float(group_text_grad)
        self.group_text_grad_start = group_text_grad_start
        self.group_image_grad = group_image_grad
        self.group_weights_grad = group_weights_grad
        self.group_gather = group_gather
        self.group_warmup_steps = group_warmup_steps
        self.group_warmup_fraction = group_warmup_fraction
        self.group_cooldown_fraction = group_cooldown_fraction
        self.run_steps: int | None = None
        self.local_loss = local_loss
        self.max_local_logit_scale = math.log(1 / group_temperature_min)
        self.local_logit_scale = nn.Parameter(torch.tensor(math.log(1 / group_temperature_init)))
        groups = self.group_weight > 0 and (text_slots is None or self._grouped_slots(text_slots) >= self._texts_needed)
        self.needs = ModelNeeds(
            patches=groups, tokens=groups and self.uses_tokens, patch_projection_grad=group_projection_grad
        )
        # A parameter no term uses would stop DDP ("parameters that were not used in producing loss").
        self.local_logit_scale.requires_grad_(groups and group_temperature == "local")
        # W = I + delta: a matrix, so weight decay pulls W back toward the identity, not toward 0.
        self.group_text_delta = nn.Parameter(torch.zeros(embed_dim, embed_dim), requires_grad=groups) if group_text_adapter else None

    @classmethod
    def from_config(cls, config, text_slots: int, embed_dim: int, global_batch: int | None = None) -> DreamLIPObjective:
        return cls(
            **{name: getattr(config, name) for name in cls.Config.__dataclass_fields__}, text_slots=text_slots, embed_dim=embed_dim
        )

    @property
    def uses_tokens(self) -> bool:
        """Whether the grouping term groups text tokens (``token_emb``, ``token_mask``)."""
        return self.group_granularity == "token"

    @property
    def _texts_needed(self) -> int:
        # Sub-captions are each other's negatives, so it takes two; a text's tokens are their own.
        return 1 if self.uses_tokens else 2

    def _grouped_slots(self, text_slots: int) -> int:
        return text_slots if self.group_slots == "all" else text_slots - 1

    def forward(self, outputs: Outputs, step: int = 0) -> dict[str, torch.Tensor]:
        """Terms ``mpcl`` (weighted by ``global_weight``) and ``group`` (by ``group_weight`` times
        the schedule's factor, :meth:`_schedule`), the latter only when it runs."""
        image_emb, text_emb, logit_scale = outputs["image_emb"], outputs["text_emb"], outputs["logit_scale"]
        all_images, rows = gather_with_grad(image_emb)
        all_texts, _ = gather_with_grad(text_emb)
        mpcl = multi_positive_contrastive_loss(all_images, all_texts, logit_scale, rows if self.local_loss else None)
        terms = {"mpcl": self.global_weight * mpcl}
        slots = slice(None) if self.group_slots == "all" else slice(1, None)
        if not (self.group_weight > 0 and self._grouped_slots(text_emb.shape[1]) >= self._texts_needed):
            return terms
        scale = logit_scale if self.group_temperature == "global" else self.local_logit_scale
        patch_emb = outputs.get("patch_emb")
        if patch_emb is None:
            raise ValueError("the grouping loss needs patch_emb (the model's patch tokens)")
        if self.uses_tokens:
            token_emb, token_mask = outputs.get("token_emb"), outputs.get("token_mask")
            if token_emb is None or token_mask is None:
                raise ValueError("token-level grouping needs token_emb and token_mask (DreamLIPModel.forward with with_tokens=True)")
            grouped_texts = token_emb[:, slots]
        else:
            grouped_texts = text_emb[:, slots]
        share = self.text_grad_share_at(step)
        if share < 1:  # train the patches toward the texts more than the texts toward patch space
            frozen = grouped_texts.detach()
            # The value is the texts' to the bit (x - x is 0); only the share of the gradient passes.
            grouped_texts = frozen if share == 0 else frozen + share * (grouped_texts - frozen)
        grouped_texts = self.local_text(grouped_texts)  # after the stop: the adapter learns whether or not the texts do
        if not self.group_image_grad:  # train the texts toward the patches; the image tower is the global term's alone
            patch_emb = patch_emb.detach()
        if self.uses_tokens:
            # Each text's term needs only its own image's patches, so nothing travels: this is the
            # mean over this rank's texts. DDP's mean over ranks is the global batch's when every
            # rank has as many texts with two or more valid tokens, else those weigh slightly
            # differently (the "image" sub-caption path under local_loss is exact: K texts an image).
            group = token_grouping_loss(
                grouped_texts, token_mask[:, slots], patch_emb, scale, self.group_threshold, self.group_weights_grad
            )
        else:
            group = self._grouping(grouped_texts, patch_emb, scale)
        terms["group"] = self._schedule(step) * self.group_weight * group
        return terms

    def local_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings ``[..., D]`` as the grouping term matches them to patch tokens:
        through the term's adapter when it has one (``group_text_adapter``), else unchanged. A
        training device only: evaluation scores patches against the plain text embeddings."""
        if self.group_text_delta is None:
            return text_emb
        return F.normalize(text_emb + text_emb @ self.group_text_delta.T, dim=-1)

    def text_grad_share_at(self, step: int) -> float:
        """The share of the grouping gradient that reaches the texts at optimizer step ``step``
        (0-based): none before ``group_text_grad_start`` of the run, ``group_text_grad``'s from then on."""
        if not (self.text_grad_share and self.group_text_grad_start):
            return self.text_grad_share
        start = round(self.group_text_grad_start * self._run_steps("group_text_grad_start"))
        return self.text_grad_share if step >= start else 0.0

    def set_run_length(self, total_steps: int) -> None:
        self.run_steps = total_steps

    def _schedule(self, step: int) -> float:
        """The grouping weight's factor at optimizer step ``step`` (0-based): the warm-up's
        ``min(1, (step + 1) / warmup)``, times the cool-down's ``min(1, (run - step - 1) / cooldown)``
        (0 at the run's last step)."""
        warmup = self._warmup_steps()
        factor = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if self.group_cooldown_fraction:
            run = self._run_steps("group_cooldown_fraction")
            cooldown = max(1, round(self.group_cooldown_fraction * run))
            factor *= max(0.0, min(1.0, (run - step - 1) / cooldown))
        return factor

    def _run_steps(self, option: str) -> int:
        if self.run_steps is None:
            raise ValueError(
                f"loss.{option}={getattr(self, option)} is a share of the run, whose length this objective was not "
                "told (set_run_length; the trainer calls it)"
            )
        return self.run_steps

    def _warmup_steps(self) -> int:
        """The grouping weight's ramp in optimizer steps: ``group_warmup_steps``, else its fraction
        of the run (0: no ramp, the paper's constant weight)."""
        if self.group_warmup_steps or not self.group_warmup_fraction:
            return self.group_warmup_steps
        return max(1, round(self.group_warmup_fraction * self._run_steps("group_warmup_fraction")))

    def _grouping(self, subcaptions: torch.Tensor, patch_emb: torch.Tensor, local_logit_scale: torch.Tensor) -> torch.Tensor:
        if self.group_negatives == "cross":
            # Every text against every image's patches is O(B^2 K N D): by default the negatives are
            # the other images of this rank's batch, so neither patches nor grouped embeddings travel.
            rows = None
            if self.group_gather:
                subcaptions, rows = gather_with_grad(subcaptions)
                patch_emb, _ = gather_with_grad(patch_emb)
            return cross_image_grouping_loss(
                subcaptions, patch_emb, local_logit_scale, self.group_threshold, self.group_weights_grad,
                rows if self.local_loss else None,
            )
        # Grouping needs only each image's own patches, so it runs before any gather and only the
        # [B, K, D] grouped embeddings travel, never the [B, N, D] patch tokens.
        grouped, _ = group_patches(subcaptions, patch_emb, self.group_threshold, self.group_weights_grad)
        scale = inverse_temperature(local_logit_scale)
        if self.local_loss and self.group_negatives == "image":
            # Per-image terms: this rank's images are exactly its share, no communication needed.
            return paired_infonce(subcaptions, grouped, scale)
        all_texts, rows = gather_with_grad(subcaptions)
        all_grouped, _ = gather_with_grad(grouped)
        x, y = grouping_pairs(all_texts, all_grouped, self.group_negatives)
        if not self.local_loss:
            return paired_infonce(x, y, scale)
        slots = subcaptions.shape[1]
        return paired_infonce(x, y, scale, slice(rows.start * slots, rows.stop * slots))

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        self.local_logit_scale.clamp_(0, self.max_local_logit_scale)

    def scalars(self) -> dict[str, float]:
        return {"local_logit_scale": float(self.local_logit_scale.detach().exp())}
