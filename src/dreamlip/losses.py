"""The DreamLIP objective: multi-positive contrastive loss plus sub-caption-to-patch grouping loss.

``L = w_global * L_mpcl + w_group * L_group`` as ``docs/method.md`` ("Objective") states it. All functions take
L2-normalised embeddings and *log*-scale temperatures (``s = exp(logit_scale)``, clamped at 100).
:class:`DreamLIPLoss` adds the distributed part: embeddings from every rank are gathered with their
gradients, so the loss is over the global batch whatever the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DreamLIPLoss",
    "LossOutput",
    "gather_with_grad",
    "group_patches",
    "cross_image_grouping_loss",
    "grouping_loss",
    "multi_positive_contrastive_loss",
    "token_grouping_loss",
]

MAX_LOGIT_SCALE = math.log(100.0)
Negatives = Literal["image", "batch", "cross"]
GroupTemperature = Literal["local", "global"]
GroupSlots = Literal["subcaptions", "all"]
GroupGranularity = Literal["subcaption", "token"]


def _scale(logit_scale: torch.Tensor) -> torch.Tensor:
    return logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def _paired_infonce(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over groups of paired embeddings.

    ``x`` and ``y`` are ``[G, n, D]`` with ``x[g, i]`` paired to ``y[g, i]``; within a group every
    other item is a negative. Returns the mean over groups and items of
    ``1/2 [CE_i(s x_gi . y_gn over n) + CE_i(s y_gi . x_gn over n)]``. With ``rows`` only those
    items' terms are computed (the local slice of a gathered batch); averaging that over equal
    slices gives the full loss.
    """
    n = x.shape[1]
    if rows is None:
        logits_xy = scale * x @ y.transpose(1, 2)
        return _symmetric_cross_entropy(logits_xy, logits_xy.transpose(1, 2), torch.arange(n, device=x.device))
    logits_xy = scale * x[:, rows] @ y.transpose(1, 2)
    logits_yx = scale * y[:, rows] @ x.transpose(1, 2)
    return _symmetric_cross_entropy(logits_xy, logits_yx, torch.arange(n, device=x.device)[rows])


def _symmetric_cross_entropy(
    logits_xy: torch.Tensor, logits_yx: torch.Tensor, target: torch.Tensor, row_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``1/2 [CE(logits_xy) + CE(logits_yx)]`` over ``[G, rows, n]`` logits, row i's class ``target[i]`` in every group.

    The mean over groups and rows, or with ``row_weights`` ``[G, rows]`` the sum of the rows' terms so weighted.
    """
    groups, _, n = logits_xy.shape
    target = target.repeat(groups)
    if row_weights is None:
        return 0.5 * (F.cross_entropy(logits_xy.reshape(-1, n), target) + F.cross_entropy(logits_yx.reshape(-1, n), target))
    both = F.cross_entropy(logits_xy.reshape(-1, n), target, reduction="none") + F.cross_entropy(
        logits_yx.reshape(-1, n), target, reduction="none"
    )
    return 0.5 * (row_weights.reshape(-1) * both).sum()


def _check(name: str, tensor: torch.Tensor, ndim: int) -> None:
    if tensor.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")


def _check_texts_and_patches(text_emb: torch.Tensor, patch_emb: torch.Tensor) -> None:
    """``[B, T, D]`` texts and ``[B, N, D]`` patches of the same images."""
    _check("text_emb", text_emb, 3)
    _check("patch_emb", patch_emb, 3)
    if text_emb.shape[0] != patch_emb.shape[0] or text_emb.shape[-1] != patch_emb.shape[-1]:
        raise ValueError(f"text_emb {tuple(text_emb.shape)} and patch_emb {tuple(patch_emb.shape)} do not pair up")


def _mpcl(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, rows: slice | None) -> torch.Tensor:
    _check("image_emb", image_emb, 2)
    _check("text_emb", text_emb, 3)
    if image_emb.shape[0] != text_emb.shape[0] or image_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} do not pair up")
    slots = text_emb.shape[1]
    # One group per text slot j: images {v_i} against that slot's texts {t_ij}.
    images = image_emb.unsqueeze(0).expand(slots, -1, -1)
    return _paired_infonce(images, text_emb.transpose(0, 1), _scale(logit_scale), rows)


def multi_positive_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """L_mpcl: mean over text slots of the symmetric image-text InfoNCE over the batch.

    ``image_emb`` ``[B, D]``, ``text_emb`` ``[B, T, D]`` (slot 0 the raw caption, 1..K
    sub-captions). With ``T == 1`` this is the standard CLIP loss.
    """
    return _mpcl(image_emb, text_emb, logit_scale, rows=None)


def group_patches(
    text_emb: torch.Tensor, patch_emb: torch.Tensor, threshold: float | None = None, weights_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's grouped visual embedding and the patch weights behind it.

    ``text_emb`` ``[B, T, D]``, ``patch_emb`` ``[B, N, D]``. Similarities are min-max normalised
    over the N patches, weights below ``threshold`` (default ``1/N``) are zeroed and the rest
    renormalised to sum to 1. Returns the normalised grouped embeddings ``[B, T, D]`` and the
    weights ``[B, T, N]``. With ``weights_grad=False`` the weights are constants to autograd: a
    loss on the grouped embeddings then moves the pooled patches, not which patches are pooled.
    """
    _check_texts_and_patches(text_emb, patch_emb)
    similarity = text_emb @ patch_emb.transpose(1, 2)  # [B, T, N]
    weights = _pooling_weights(similarity if weights_grad else similarity.detach(), threshold)
    grouped = F.normalize(weights @ patch_emb, dim=-1)
    return grouped, weights


def _pooling_weights(similarity: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Min-max over the last (patch) axis, zero below ``threshold`` (default 1/N), renormalise."""
    num_patches = similarity.shape[-1]
    threshold = 1.0 / num_patches if threshold is None else threshold
    low = similarity.amin(dim=-1, keepdim=True)
    high = similarity.amax(dim=-1, keepdim=True)
    spread = high - low
    normalised = (similarity - low) / spread.clamp_min(torch.finfo(similarity.dtype).eps)
    weights = normalised * (normalised >= threshold)
    total = weights.sum(dim=-1, keepdim=True)
    # All patches equally similar (spread 0): no patch stands out, so weigh them all equally.
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), 1.0 / num_patches)


def _cross_scores(text_emb: torch.Tensor, patch_emb: torch.Tensor, threshold: float | None, weights_grad: bool) -> torch.Tensor:
    """``t_bk . g(t_bk, c)`` for every text ``(b, k)`` of ``text_emb`` ``[B, K, D]`` and every image ``c``
    of ``patch_emb`` ``[C, N, D]``: ``[C images, B texts, K slots]``."""
    batch, slots, dim = text_emb.shape
    similarity = text_emb.reshape(1, batch * slots, dim) @ patch_emb.transpose(1, 2)  # [C images, B*K texts, N]
    weights = _pooling_weights(similarity if weights_grad else similarity.detach(), threshold)
    # t . normalise(sum_n w_n p_n) without the [C, B*K, D] pooled embeddings: the dot product is
    # sum_n w_n (t . p_n) and the squared norm w^T (P P^T) w, so memory is O(C B K N), not O(C B K D).
    pooled_dot_text = (weights * similarity).sum(dim=-1)
    gram = patch_emb @ patch_emb.transpose(1, 2)  # [C, N, N]
    pooled_norm = ((weights @ gram) * weights).sum(dim=-1).clamp_min(1e-24).sqrt()  # F.normalize's eps, squared
    return (pooled_dot_text / pooled_norm).reshape(patch_emb.shape[0], batch, slots)


def cross_image_grouping_loss(
    text_emb: torch.Tensor,
    patch_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    threshold: float | None = None,
    weights_grad: bool = True,
    rows: slice | None = None,
) -> torch.Tensor:
    """L_group with other images as negatives: every text is grouped over every image's patches.

    ``text_emb`` ``[B, K, D]``, ``patch_emb`` ``[B, N, D]``. Text ``(b, k)`` grouped over image
    ``c``'s patches scores ``t_bk . g(t_bk, c)``; for each slot k this is a ``B x B`` logit matrix
    whose diagonal holds the true pairs, scored by symmetric InfoNCE and averaged over slots. A
    text pooled over its own image is no longer the winner by construction (as it is against
    its image's other texts): the patches must hold what the text says for its image to win.
    With ``rows`` only those images' terms are computed (their texts against every image, every
    text against them: the local slice of a gathered batch); averaging that over equal slices
    gives the full loss.
    """
    _check_texts_and_patches(text_emb, patch_emb)
    target = torch.arange(text_emb.shape[0], device=text_emb.device)
    scale = _scale(logit_scale)
    if rows is None:
        logits_text_image = scale * _cross_scores(text_emb, patch_emb, threshold, weights_grad).permute(2, 1, 0)  # [slot, text, image]
        return _symmetric_cross_entropy(logits_text_image, logits_text_image.transpose(1, 2), target)
    logits_text_image = scale * _cross_scores(text_emb[rows], patch_emb, threshold, weights_grad).permute(2, 1, 0)
    logits_image_text = scale * _cross_scores(text_emb, patch_emb[rows], threshold, weights_grad).permute(2, 0, 1)
    return _symmetric_cross_entropy(logits_text_image, logits_image_text, target[rows])


def token_grouping_loss(
    token_emb: torch.Tensor,
    token_mask: torch.Tensor,
    patch_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    threshold: float | None = None,
    weights_grad: bool = True,
) -> torch.Tensor:
    """SPARC's fine-grained loss: each text token against its grouped visual embedding.

    ``token_emb`` ``[B, T, L, D]`` (T texts of image b, L token positions), ``token_mask``
    ``[B, T, L]`` marking the content tokens (not start, end or padding), ``patch_emb`` ``[B, N, D]``.
    Every token is grouped over its own image's patches as a sub-caption is (:func:`group_patches`);
    within each text, symmetric InfoNCE between its valid tokens and their grouped embeddings, the
    text's other valid tokens the negatives. Averaged over a text's valid tokens, then over the texts
    with at least two of them (with one there is no negative); 0 when no text has two.
    """
    _check("token_emb", token_emb, 4)
    if token_mask.shape != token_emb.shape[:-1]:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} does not match token_emb {tuple(token_emb.shape)}")
    batch, slots, length, dim = token_emb.shape
    # Every token of image b's texts pools image b's patches: one [B, T*L, N] similarity.
    grouped, _ = group_patches(token_emb.reshape(batch, slots * length, dim), patch_emb, threshold, weights_grad)
    tokens = token_emb.reshape(batch * slots, length, dim)
    grouped = grouped.reshape(batch * slots, length, dim)
    valid = token_mask.reshape(batch * slots, length)
    # Rows of valid tokens see only valid columns; other rows keep every column, so their (weight 0)
    # terms stay finite instead of turning 0 * inf into NaN.
    keep = valid.unsqueeze(1) | ~valid.unsqueeze(2)
    logits = _scale(logit_scale) * tokens @ grouped.transpose(1, 2)  # [text, token, grouped token]
    logits_xy = logits.masked_fill(~keep, -torch.inf)
    logits_yx = logits.transpose(1, 2).masked_fill(~keep, -torch.inf)
    counts = valid.sum(dim=-1, keepdim=True)
    contributing = counts >= 2
    row_weights = (valid & contributing).to(logits.dtype) / counts.clamp_min(1) / contributing.sum().clamp_min(1)
    target = torch.arange(length, device=token_emb.device)
    return _symmetric_cross_entropy(logits_xy, logits_yx, target, row_weights)


def _grouping_pairs(text_emb: torch.Tensor, grouped: torch.Tensor, negatives: Negatives) -> tuple[torch.Tensor, torch.Tensor]:
    if negatives == "image":  # the image's other sub-captions (paper, SPARC): one group per image
        return text_emb, grouped
    if negatives == "batch":  # every sub-caption in the batch (authors' code): one group
        return text_emb.reshape(1, -1, text_emb.shape[-1]), grouped.reshape(1, -1, grouped.shape[-1])
    raise ValueError(f"negatives must be 'image' or 'batch', got {negatives!r}")


def grouping_loss(
    text_emb: torch.Tensor,
    patch_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    threshold: float | None = None,
    negatives: Negatives = "image",
) -> torch.Tensor:
    """L_group: symmetric InfoNCE between each text and its grouped visual embedding.

    ``negatives="image"`` contrasts against the same image's other texts; ``"batch"`` against every
    text in the batch. ``logit_scale`` is the grouping loss's own (local) temperature.
    """
    grouped, _ = group_patches(text_emb, patch_emb, threshold)
    x, y = _grouping_pairs(text_emb, grouped, negatives)
    return _paired_infonce(x, y, _scale(logit_scale))


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own slice.

    Every rank's loss depends on every rank's slice, so a slice's gradient is the sum over ranks
    (an all_reduce). Written out here because torch's deprecated ``distributed.nn.all_gather``
    returned wrong gradients on gloo in our tests, and this form works on every backend.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping gradients to every rank's slice.

    Returns the gathered tensor and the slice that is this rank's own. Batches must be the same
    size on every rank (all_gather needs equal shapes).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, slice(0, tensor.shape[0])
    start = dist.get_rank() * tensor.shape[0]
    return _AllGatherWithGrad.apply(tensor), slice(start, start + tensor.shape[0])


@dataclass
class LossOutput:
    loss: torch.Tensor
    mpcl: torch.Tensor
    group: torch.Tensor | None


class DreamLIPLoss(nn.Module):
    """``w_global * L_mpcl + w_group * L_group`` over the global batch.

    The grouping loss contrasts each sub-caption with other images (``group_negatives="cross"``,
    the default: each sub-caption grouped over their patches), with its own image's other sub-captions
    (``"image"``, the paper's) or with every sub-caption of the batch (``"batch"``). It runs on
    the sub-caption slots 1..K (``group_slots="subcaptions"``: slot 0, the raw alt-text, describes
    the whole image) or on every slot (``"all"``); with its own learnable
    temperature (``group_temperature="local"``) or the contrastive loss's (``"global"``); with
    ``group_text_grad=False`` its gradient reaches the image tower only (the default ``True`` is
    the paper's: both towers; docs/method.md, "Grouping-loss default and why"); with
    ``group_weights_grad=False`` it reaches the patches only through the pooled average, not
    through the similarities that choose the pooling weights. With ``group_granularity="token"``
    it groups each text token instead of each sub-caption (SPARC's, :func:`token_grouping_loss`;
    image negatives only). The ``cross`` negatives are each rank's own images (no patch token travels);
    with ``group_gather`` texts and patches are gathered so they are the global batch's, as in one
    process, at ``O(B^2 K N)`` memory on every rank (``O(b B K N)`` with ``local_loss``). With ``local_loss`` each
    rank computes only its own rows of the global logits (O(b * B) instead of O(B^2)); its loss
    value is then that rank's share, whose mean over ranks is the global loss, and DDP's gradient
    averaging makes the update identical.
    """

    def __init__(
        self,
        global_weight: float = 1.0,
        group_weight: float = 1.0,
        group_threshold: float | None = None,
        group_negatives: Negatives = "cross",  # as LossConfig's: the paper's is "image" (docs/method.md)
        local_loss: bool = False,
        group_temperature: GroupTemperature = "local",
        group_slots: GroupSlots = "subcaptions",
        group_text_grad: bool = True,
        group_weights_grad: bool = True,
        group_granularity: GroupGranularity = "subcaption",
        group_gather: bool = False,
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
        self.global_weight = global_weight
        self.group_weight = group_weight
        self.group_threshold = group_threshold
        self.group_negatives = group_negatives
        self.local_loss = local_loss
        self.group_temperature = group_temperature
        self.group_slots = group_slots
        self.group_text_grad = group_text_grad
        self.group_weights_grad = group_weights_grad
        self.group_granularity = group_granularity
        self.group_gather = group_gather

    @property
    def uses_patches(self) -> bool:
        return self.group_weight > 0

    @property
    def uses_tokens(self) -> bool:
        """Whether the loss needs the texts' per-token embeddings (``token_emb``, ``token_mask``)."""
        return self.uses_patches and self.group_granularity == "token"

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        patch_emb: torch.Tensor | None = None,
        local_logit_scale: torch.Tensor | None = None,
        group_scale: float = 1.0,
        token_emb: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> LossOutput:
        """``group_scale`` multiplies the grouping weight (the trainer's warm-up of that weight).

        Token-level grouping takes the texts' ``token_emb`` ``[B, T, L, D]`` and ``token_mask``
        ``[B, T, L]`` (``DreamLIPModel.forward(..., with_tokens=True)``).
        """
        all_images, rows = gather_with_grad(image_emb)
        all_texts, _ = gather_with_grad(text_emb)
        mpcl = _mpcl(all_images, all_texts, logit_scale, rows if self.local_loss else None)
        loss = self.global_weight * mpcl
        group = None
        slots = slice(None) if self.group_slots == "all" else slice(1, None)
        # Sub-captions are each other's negatives, so it takes two; a text's tokens are their own.
        enough_texts = text_emb[:, slots].shape[1] >= (1 if self.uses_tokens else 2)
        if self.uses_patches and enough_texts:
            scale = logit_scale if self.group_temperature == "global" else local_logit_scale
            if patch_emb is None or scale is None:
                raise ValueError("the grouping loss needs patch_emb and local_logit_scale")
            if self.uses_tokens and (token_emb is None or token_mask is None):
                raise ValueError("token-level grouping needs token_emb and token_mask (DreamLIPModel.forward with with_tokens=True)")
            grouped_texts = token_emb[:, slots] if self.uses_tokens else text_emb[:, slots]
            if not self.group_text_grad:  # train the patches toward the texts, not the texts toward patch space
                grouped_texts = grouped_texts.detach()
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
            loss = loss + group_scale * self.group_weight * group
        return LossOutput(loss=loss, mpcl=mpcl, group=group)

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
        scale = _scale(local_logit_scale)
        if self.local_loss and self.group_negatives == "image":
            # Per-image terms: this rank's images are exactly its share, no communication needed.
            return _paired_infonce(subcaptions, grouped, scale)
        all_texts, rows = gather_with_grad(subcaptions)
        all_grouped, _ = gather_with_grad(grouped)
        x, y = _grouping_pairs(all_texts, all_grouped, self.group_negatives)
        if not self.local_loss:
            return _paired_infonce(x, y, scale)
        slots = subcaptions.shape[1]
        return _paired_infonce(x, y, scale, slice(rows.start * slots, rows.stop * slots))
