"""COSMOS's objective (Kim et al., CVPR 2025, arXiv 2412.01814): CLIP's loss on global views and
text crops, plus cross-modal self-distillation from an EMA teacher (docs/method.md, "COSMOS").

The student sees every view (2 global and N local image crops, 2 global and K - 1 local text
crops); its cross-attention modules (this objective's) make cross-modal features of each: an
image view attends to the first global caption's tokens, a text to the first global view's patch
tokens, each added to the view's own feature. Those are distilled, with their own temperature,
into the teacher's embeddings of the global views and global captions. The teacher is an EMA of
the student's model, held here and checkpointed with the objective's parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dreamlip.losses import gather_with_grad, inverse_temperature, paired_infonce
from dreamlip.views import GLOBAL_VIEWS

from .base import ModelNeeds, Objective, Outputs, ViewNeeds, register

__all__ = ["COSMOSObjective", "CrossModalPooler", "cross_view_infonce", "resized_positions"]

MomentumSchedule = Literal["fixed", "cosine"]
_TEACHER = "teacher."


class CrossModalPooler(nn.Module):
    """COSMOS's ``AttentionalCrossPooler``: queries ``[B, Q, D]`` attend to one sample's tokens
    ``[B, L, D]`` (multi-head attention, a layer norm on the queries and one on the keys, which
    are also the values); ``ignore`` ``[B, L]`` marks tokens to leave out. Returns ``[B, Q, D]``."""

    def __init__(self, dim: int, heads: int = 8):
        super().__init__()
        if dim % heads:
            raise ValueError(f"loss.cosmos_pool_heads={heads} does not divide the embedding width {dim}")
        self.ln_q, self.ln_k = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
        keys = self.ln_k(tokens)
        return self.attn(self.ln_q(queries), keys, keys, key_padding_mask=ignore, need_weights=False)[0]


def cross_view_infonce(student: torch.Tensor, teacher: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """COSMOS's ``ClipLoss`` over lists of views: the mean, over every pair of a view ``s`` of
    ``student`` ``[n, S, D]`` and a view ``r`` of ``teacher`` ``[n, R, D]``, of CLIP's symmetric
    InfoNCE between ``student[:, s]`` and ``teacher[:, r]`` (sample i's views paired)."""
    n, views, dim = student.shape
    targets = teacher.shape[1]
    x = student.transpose(0, 1).unsqueeze(1).expand(views, targets, n, dim).reshape(views * targets, n, dim)
    y = teacher.transpose(0, 1).unsqueeze(0).expand(views, targets, n, dim).reshape(views * targets, n, dim)
    return paired_infonce(x, y, scale)


def resized_positions(positions: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A ViT's ``[1 + g*g, W]`` positional embedding (class token first) for another patch grid:
    the patch positions bicubically interpolated as DINO's and COSMOS's ``interpolate_pos_encoding``."""
    if tuple(grid) == tuple(new_grid):
        return positions
    cls, patches = positions[:1], positions[1:]
    width = patches.shape[-1]
    patches = patches.reshape(1, *grid, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=new_grid, mode="bicubic", align_corners=False).to(positions.dtype)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(-1, width)])


def _encode_local_views(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The image tower's projected (not normalised) global features of crops smaller than its input."""
    visual = model.clip.visual
    new_grid = (images.shape[-2] // visual.patch_size[0], images.shape[-1] // visual.patch_size[1])
    positions = resized_positions(visual.positional_embedding, visual.grid_size, new_grid)
    return torch.func.functional_call(visual, {"positional_embedding": positions}, (images,))


@register
class COSMOSObjective(Objective):
    """``cosmos_clip_weight * L_clip + cosmos_distill_weight * L_distill`` (COSMOS's: 1 and 1),
    terms ``clip`` and ``distill``.

    ``L_clip``: :func:`cross_view_infonce` between the student's 2 global image views and all its
    K + 1 text crops, at the model's temperature (local image crops left out, as COSMOS does).
    ``L_distill``: the mean of 4 :func:`cross_view_infonce` terms, the student's cross-modal image
    and text features (every view) against the teacher's global image and global caption
    embeddings, at this objective's own temperature (``distill_logit_scale``, CLIP's start 1/0.07,
    at most 100). Every embedding is gathered from every rank; tokens never leave their rank.

    The teacher starts as the student's copy (:meth:`bind`) and follows it by EMA once per step,
    after the backward and before the update, as COSMOS's ``train_one_epoch``: ``t <- m t + (1 - m)
    s`` with ``m`` = ``cosmos_momentum`` (``fixed``, every COSMOS config) or rising to 1 on a
    cosine over the run (``cosine``).
    """

    name = "cosmos"
    needs_hint = "COSMOS's cross-attention reads the first global view's patch tokens"

    @dataclass
    class Config:
        cosmos_clip_weight: float = 1.0
        cosmos_distill_weight: float = 1.0
        cosmos_distill_temperature_init: float = 0.07  # the distillation temperature's start (CLIP's)
        cosmos_momentum: float = 0.999  # the teacher's EMA momentum: COSMOS's CC3M config (0.99 at CC12M and up)
        cosmos_momentum_schedule: MomentumSchedule = "fixed"  # COSMOS's --fix-momentum; cosine: to 1 over the run
        cosmos_local_crops: int = 6
        cosmos_crop_scale: float = 0.4  # global crops cover crop_scale..1 of the image, local ones 0.05..crop_scale
        cosmos_pool_heads: int = 8  # the cross-attention modules' heads

    def __init__(
        self,
        embed_dim: int,
        cosmos_clip_weight: float = 1.0,
        cosmos_distill_weight: float = 1.0,
        cosmos_distill_temperature_init: float = 0.07,
        cosmos_momentum: float = 0.999,
        cosmos_momentum_schedule: MomentumSchedule = "fixed",
        cosmos_local_crops: int = 6,
        cosmos_crop_scale: float = 0.4,
        cosmos_pool_heads: int = 8,
        text_slots: int | None = None,
    ):
        super().__init__()
        if text_slots is not None and text_slots < GLOBAL_VIEWS + 1:
            raise ValueError(
                f"COSMOS's text crops are 2 global captions and at least one local one: captions.k + 1 = {text_slots} "
                "texts per image is too few (its configs: captions.k=7, 8 texts)"
            )
        if cosmos_momentum_schedule not in ("fixed", "cosine"):
            raise ValueError(f"loss.cosmos_momentum_schedule must be 'fixed' or 'cosine', got {cosmos_momentum_schedule!r}")
        if not 0 <= cosmos_momentum <= 1:
            raise ValueError(f"loss.cosmos_momentum must be in 0..1, got {cosmos_momentum}")
        self.clip_weight, self.distill_weight = cosmos_clip_weight, cosmos_distill_weight
        self.base_momentum, self.momentum_schedule = cosmos_momentum, cosmos_momentum_schedule
        self.max_distill_logit_scale = math.log(100)
        self.distill_logit_scale = nn.Parameter(torch.tensor(math.log(1 / cosmos_distill_temperature_init)))
        # The student's cross-attention: images attend to caption tokens, texts to patch tokens, each
        # read through its own token mapping (COSMOS's image_token_mapping, text_token_mapping).
        self.image_token_mapping, self.text_token_mapping = nn.Linear(embed_dim, embed_dim), nn.Linear(embed_dim, embed_dim)
        self.caption_pool = CrossModalPooler(embed_dim, cosmos_pool_heads)
        self.patch_pool = CrossModalPooler(embed_dim, cosmos_pool_heads)
        self.register_buffer("momentum", torch.tensor(float(cosmos_momentum), dtype=torch.float64))
        self.teacher: nn.Module | None = None
        self.register_load_state_dict_pre_hook(self._drop_unbound_teacher)
        self.needs = ModelNeeds(patches=True)
        self.views = ViewNeeds(local_crops=cosmos_local_crops, crop_scale=cosmos_crop_scale)

    @classmethod
    def from_config(cls, config, text_slots: int, embed_dim: int, global_batch: int | None = None) -> COSMOSObjective:
        return cls(embed_dim, **{name: getattr(config, name) for name in cls.Config.__dataclass_fields__}, text_slots=text_slots)

    def bind(self, model: nn.Module) -> None:
        # Not trained by the optimizer: it follows the student (after_backward).
        self.teacher = copy.deepcopy(model).requires_grad_(False)

    def check_strategy(self, sharded: bool) -> None:
        if sharded:
            raise ValueError(
                "the cosmos objective's EMA teacher is a whole copy of the model, updated from the student's "
                "whole weights every step: under FSDP2 it would be a full replica beside a sharded student "
                "(sharding it like the student is not implemented). Train it with run.strategy=ddp"
            )

    @staticmethod
    def _drop_unbound_teacher(module: COSMOSObjective, state_dict: dict[str, Any], prefix: str, *_) -> None:
        """Loaded to evaluate, serve or export, with no student bound: the teacher is training state,
        and those use the student's own encoders. A load hook, so it holds wherever this objective
        sits (alone, or a part of a combination)."""
        if module.teacher is None:
            for name in [name for name in state_dict if name.startswith(prefix + _TEACHER)]:
                del state_dict[name]

    def encode_views(self, model: nn.Module, images: torch.Tensor, local_images: torch.Tensor, texts: torch.Tensor) -> Outputs:
        """The student's features (projected, not normalised) of every view, its tokens of the
        first global view and caption, and the teacher's embeddings of the global ones; and, for the
        objectives it is combined with (``cosmos+dreamlip``), the one-view outputs ``image_emb``,
        ``text_emb`` and ``patch_emb`` of the first global view and every text crop, normalised."""
        batch = images.shape[0]
        global_features, patches = model.encode_image(images.flatten(0, 1), with_patches=True, normalize=False)
        view_features = [global_features.view(batch, GLOBAL_VIEWS, -1)]
        if local_images.shape[1]:
            view_features.append(_encode_local_views(model, local_images.flatten(0, 1)).view(batch, local_images.shape[1], -1))
        first, caption_tokens, content = model.encode_text(texts[:, 0], with_tokens=True, normalize=False)
        others = model.encode_text(texts[:, 1:], normalize=False)
        # Keys: every position up to the end token (the start and end tokens too), not the padding;
        # padded to the context, so accumulated micro-batches (each cut at its longest) concatenate.
        end = content.sum(dim=-1, keepdim=True) + 1
        caption_mask = torch.arange(texts.shape[-1], device=content.device) <= end
        caption_tokens = F.pad(caption_tokens, (0, 0, 0, texts.shape[-1] - caption_tokens.shape[1]))
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("the cosmos objective has no teacher: bind(model) first")
        with torch.no_grad():
            teacher_images = teacher.encode_image(images.flatten(0, 1))[0].view(batch, GLOBAL_VIEWS, -1)
            teacher_texts = teacher.encode_text(texts[:, :GLOBAL_VIEWS])
        text_features = torch.cat([first.unsqueeze(1), others], dim=1).float()
        patch_tokens = patches.view(batch, GLOBAL_VIEWS, *patches.shape[1:])[:, 0].float()
        return {
            "view_features": torch.cat(view_features, dim=1).float(),
            "text_features": text_features,
            "patch_tokens": patch_tokens,
            "image_emb": F.normalize(view_features[0][:, 0].float(), dim=-1),
            "text_emb": F.normalize(text_features, dim=-1),
            "patch_emb": F.normalize(patch_tokens, dim=-1),
            "caption_tokens": caption_tokens.float(),
            "caption_mask": caption_mask,
            "teacher_image_emb": teacher_images.float(),
            "teacher_text_emb": teacher_texts.float(),
            "logit_scale": model.clip.logit_scale,
        }

    def cross_modal(self, outputs: Outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's cross-modal features, normalised: every image view with what it pools from
        the first global caption's tokens ``[B, V, D]``, every text with what it pools from the
        first global view's patch tokens ``[B, T, D]``."""
        views, texts = outputs["view_features"], outputs["text_features"]
        captions = self.text_token_mapping(outputs["caption_tokens"])
        patches = self.image_token_mapping(outputs["patch_tokens"])
        image_cross = views + self.caption_pool(views, captions, ~outputs["caption_mask"])
        text_cross = texts + self.patch_pool(texts, patches)
        return F.normalize(image_cross, dim=-1), F.normalize(text_cross, dim=-1)

    def forward(self, outputs: Outputs, step: int = 0) -> dict[str, torch.Tensor]:
        image_cross, text_cross = self.cross_modal(outputs)
        all_views, _ = gather_with_grad(F.normalize(outputs["view_features"][:, :GLOBAL_VIEWS], dim=-1))
        all_texts, _ = gather_with_grad(F.normalize(outputs["text_features"], dim=-1))
        clip = cross_view_infonce(all_views, all_texts, inverse_temperature(outputs["logit_scale"]))
        scale = inverse_temperature(self.distill_logit_scale)
        teachers = [gather_with_grad(outputs[name])[0] for name in ("teacher_image_emb", "teacher_text_emb")]
        students = [gather_with_grad(features)[0] for features in (image_cross, text_cross)]
        distill = sum(cross_view_infonce(s, t, scale) for s in students for t in teachers) / 4
        return {"clip": self.clip_weight * clip, "distill": self.distill_weight * distill}

    def momentum_at(self, step: int, total_steps: int) -> float:
        """The EMA momentum of step ``step`` (0-based) of ``total_steps``."""
        if self.momentum_schedule == "fixed":
            return self.base_momentum
        # COSMOS's cosine_scheduler(momentum, 1, 0, total_steps)
        return 1 + 0.5 * (1 + math.cos(math.pi * step / total_steps)) * (self.base_momentum - 1)

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int, total_steps: int) -> None:
        momentum = self.momentum_at(step, total_steps)
        for teacher, student in zip(self.teacher.parameters(), model.parameters(), strict=True):
            teacher.mul_(momentum).add_((1 - momentum) * student.detach())
        self.momentum.fill_(momentum)

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        self.distill_logit_scale.clamp_(0, self.max_distill_logit_scale)

    def scalars(self) -> dict[str, float]:
        return {"distill_logit_scale": float(self.distill_logit_scale.detach().exp()), "momentum": float(self.momentum)}
