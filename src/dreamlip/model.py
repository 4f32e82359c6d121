"""An open_clip model that also returns projected patch tokens, with dynamic-length text encoding.

DreamLIP needs three things from a CLIP model per step: the global image embedding, the patch
tokens projected into the joint space (for the grouping loss), and embeddings of ``K + 1`` short
texts per image. The towers, tokenizer and checkpoint format stay open_clip's, so a model trained
here loads in open_clip and clip_benchmark unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamlip._compat import ensure_torchvision

ensure_torchvision()
import open_clip  # noqa: E402
from open_clip.transformer import VisionTransformer, text_global_pool  # noqa: E402

__all__ = ["DreamLIPModel", "ModelOutput", "PatchTokensUnavailable", "create_model", "get_tokenizer"]

open_clip.add_model_config(resources.files("dreamlip") / "model_configs")

INIT_LOGIT_SCALE = math.log(1 / 0.07)


class PatchTokensUnavailable(ValueError):
    """The image tower cannot give per-patch embeddings, which the grouping loss needs."""


@dataclass
class ModelOutput:
    image_emb: torch.Tensor  # [B, D], normalised
    text_emb: torch.Tensor  # [B, T, D] (or the token tensor's leading shape), normalised
    patch_emb: torch.Tensor | None  # [B, N, D], normalised, class token excluded
    logit_scale: torch.Tensor  # log of the global temperature's inverse
    local_logit_scale: torch.Tensor  # same, for the grouping loss


class DreamLIPModel(nn.Module):
    """Wraps an open_clip ``CLIP`` (``self.clip``) and adds the grouping loss's temperature.

    ``self.clip`` is an ordinary open_clip model: its state dict is what gets exported. The extra
    parameter ``local_logit_scale`` lives here (not in the loss) so DDP synchronises its gradient.
    """

    def __init__(self, clip: nn.Module, init_local_logit_scale: float = INIT_LOGIT_SCALE, text_buckets: int = 4):
        super().__init__()
        self.clip = clip
        self.local_logit_scale = nn.Parameter(torch.tensor(float(init_local_logit_scale)))
        self.text_buckets = text_buckets

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def has_patch_tokens(self) -> bool:
        visual = self.clip.visual
        return isinstance(visual, VisionTransformer) and visual.attn_pool is None and visual.pool_type != "none"

    def encode_image(self, images: torch.Tensor, with_patches: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised global embedding ``[B, D]`` and, if asked, normalised patch embeddings ``[B, N, D]``."""
        if not with_patches:
            return F.normalize(self.clip.encode_image(images), dim=-1), None
        if not self.has_patch_tokens:
            raise PatchTokensUnavailable(
                f"the grouping loss needs patch tokens from an open_clip VisionTransformer without "
                f"attentional pooling; this model's image tower is {type(self.clip.visual).__name__}. "
                f"Set the grouping loss weight to 0 or use a ViT tower."
            )
        visual = self.clip.visual
        # forward_intermediates applies the final norm (ln_post) to the last block's tokens and
        # pools the class token exactly as visual.forward does.
        out = visual.forward_intermediates(images, indices=1, normalize_intermediates=True, output_fmt="NLC")
        patches = out["image_intermediates"][-1] @ visual.proj  # same projection as the class token
        return F.normalize(out["image_features"], dim=-1), F.normalize(patches, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings for a token tensor ``[..., L]``, returned as ``[..., D]``.

        A causal text tower pooled at the end-of-text token only looks left, so running it on a
        sequence cropped after its end token gives the same embedding for far less work
        (sub-captions are 10-30 tokens of a 77-token context). The texts are sorted by length and
        cut into ``text_buckets`` groups of equal count, each run at its own longest length: on
        sub-captions that is about 60% of the tokens of one group padded to the longest text.
        """
        leading = tokens.shape[:-1]
        flat = tokens.reshape(-1, tokens.shape[-1])
        clip = self.clip
        if not self._can_crop_text():
            return F.normalize(clip.encode_text(flat), dim=-1).reshape(*leading, -1)
        if clip.text_pool_type == "argmax":
            end = flat.argmax(dim=-1)
        else:
            end = (flat == clip.text_eos_id).int().argmax(dim=-1)
        buckets = min(self.text_buckets, len(flat) // 8)  # tiny groups only add overhead
        if buckets <= 1:
            return F.normalize(self._encode_cropped(flat, end), dim=-1).reshape(*leading, -1)
        order = torch.argsort(end, stable=True)
        parts = [self._encode_cropped(flat[group], end[group]) for group in order.tensor_split(buckets)]
        # cat in sorted order, then the inverse permutation puts every text back in its place
        x = torch.cat(parts).index_select(0, torch.argsort(order))
        return F.normalize(x, dim=-1).reshape(*leading, -1)

    def _encode_cropped(self, flat: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features of ``flat`` run at its longest length (``end``: end positions)."""
        clip = self.clip
        length = int(end.max()) + 1 if flat.numel() else 1
        flat = flat[:, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(flat).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
        x = clip.ln_final(x)
        x = text_global_pool(x, flat, clip.text_pool_type, eos_token_id=clip.text_eos_id)
        if isinstance(clip.text_projection, nn.Linear):
            x = clip.text_projection(x)
        elif clip.text_projection is not None:
            x = x @ clip.text_projection
        return x

    def _can_crop_text(self) -> bool:
        clip = self.clip
        return (
            isinstance(clip, open_clip.CLIP)
            and clip.attn_mask is not None
            and clip.text_pool_type in ("argmax", "eos")
        )

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, with_patches: bool = True) -> ModelOutput:
        image_emb, patch_emb = self.encode_image(images, with_patches=with_patches)
        return ModelOutput(
            image_emb=image_emb,
            text_emb=self.encode_text(tokens),
            patch_emb=patch_emb,
            logit_scale=self.clip.logit_scale,
            local_logit_scale=self.local_logit_scale,
        )

    @torch.no_grad()
    def clamp_logit_scales(self, max_scale: float = 100.0) -> None:
        """Keep both temperatures' inverses at most ``max_scale`` (as open_clip does after each step)."""
        self.clip.logit_scale.clamp_(0, math.log(max_scale))
        self.local_logit_scale.clamp_(0, math.log(max_scale))


def create_model(
    model_name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **kwargs: Any,
) -> tuple[DreamLIPModel, Any, Any]:
    """Build an open_clip architecture (any name open_clip knows, plus ours in ``model_configs/``).

    ``pretrained`` is an open_clip checkpoint file (or a tag open_clip knows) to fine-tune from.
    Returns ``(model, train_transform, eval_transform)``.
    """
    with _quiet_random_init_warning():
        clip, train_transform, eval_transform = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, precision=precision, **kwargs
        )
    return DreamLIPModel(clip).to(device), train_transform, eval_transform


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns on every randomly initialised model, which is the normal case here."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def get_tokenizer(model_name: str):
    """open_clip's tokenizer for ``model_name`` (BPE vocab ships with open_clip: no download)."""
    return open_clip.get_tokenizer(model_name)
