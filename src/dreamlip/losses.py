"""The loss terms the objectives (``dreamlip.objectives``) are made of, as functions of embeddings.

DreamLIP's multi-positive contrastive loss and its sub-caption-to-patch grouping terms, as
``docs/method.md`` ("Objective") states them, SigLIP's sigmoid loss in its multi-positive form
("SigLIP") and FLAIR's text-conditioned sigmoid loss ("FLAIR"). All take L2-normalised embeddings and *log*-scale temperatures (``s =
exp(logit_scale)``, clamped at 100). :func:`gather_with_grad` is the
distributed part: embeddings from every rank with their gradients, so a loss over the gathered
batch is the global batch's whatever the number of processes.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

__all__ = [
    "MAX_LOGIT_SCALE",
    "Negatives",
    "conditioned_cosines",
    "cross_image_grouping_loss",
    "gather_with_grad",
    "group_patches",
    "grouping_loss",
    "grouping_pairs",
    "inverse_temperature",
    "multi_positive_contrastive_loss",
    "multi_positive_sigmoid_loss",
    "one_text_of_every_other_image",
    "paired_infonce",
    "sigmoid_bias_start",
    "text_conditioned_sigmoid_loss",
    "token_grouping_loss",
]

MAX_LOGIT_SCALE = math.log(100.0)
Negatives = Literal["image", "batch", "cross"]


def inverse_temperature(logit_scale: torch.Tensor) -> torch.Tensor:
    """``s = exp(logit_scale)``, at most 100 (CLIP's clamp)."""
    return logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()


def paired_infonce(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
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


def multi_positive_contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor, rows: slice | None = None
) -> torch.Tensor:
    """L_mpcl: mean over text slots of the symmetric image-text InfoNCE over the batch.

    ``image_emb`` ``[B, D]``, ``text_emb`` ``[B, T, D]`` (slot 0 the raw caption, 1..K
    sub-captions). With ``T == 1`` this is the standard CLIP loss. With ``rows`` only those
    images' and texts' terms (the local slice of a gathered batch, see :func:`paired_infonce`).
    """
    _check("image_emb", image_emb, 2)
    _check("text_emb", text_emb, 3)
    if image_emb.shape[0] != text_emb.shape[0] or image_emb.shape[-1] != text_emb.shape[-1]:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} do not pair up")
    slots = text_emb.shape[1]
    # One group per text slot j: images {v_i} against that slot's texts {t_ij}.
    images = image_emb.unsqueeze(0).expand(slots, -1, -1)
    return paired_infonce(images, text_emb.transpose(0, 1), inverse_temperature(logit_scale), rows)


def multi_positive_sigmoid_loss(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    rows: slice | None = None,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss with every text of an image a positive.

    ``text_emb`` ``[B, T, D]`` (T texts per image), ``image_emb`` ``[b, D]``: the images
    ``rows`` of the B (default all, b = B). Every image-text pair is one binary term,
    ``-log sigmoid(z (s v_i . t_nj + bias))`` with ``z = 1`` when text (n, j) is image i's, else -1;
    the loss is their sum over the b images' rows divided by ``b T``. With T = 1 that is open_clip's
    ``SigLipLoss`` (sum over pairs / b); for T > 1 it is the mean over text slots of that loss,
    which is also FLAIR's multi-positive normalisation (sum over pairs / texts). The pairs are
    independent, so the rows of different ranks add up: DDP's mean of each rank's share is the
    loss of the global batch.
    """
    _check("image_emb", image_emb, 2)
    _check("text_emb", text_emb, 3)
    batch, slots, dim = text_emb.shape
    rows = slice(0, batch) if rows is None else rows
    if image_emb.shape[0] != rows.stop - rows.start or image_emb.shape[-1] != dim:
        raise ValueError(f"image_emb {tuple(image_emb.shape)} is not rows {rows.start}:{rows.stop} of text_emb {tuple(text_emb.shape)}")
    logits = inverse_temperature(logit_scale) * image_emb @ text_emb.reshape(batch * slots, dim).T + logit_bias  # [b, B*T]
    owner = torch.arange(batch, device=text_emb.device).repeat_interleave(slots)  # image of each text column
    mine = torch.arange(rows.start, rows.stop, device=text_emb.device)
    signs = (owner.unsqueeze(0) == mine.unsqueeze(1)).to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum() / (image_emb.shape[0] * slots)


PAPERS_SIGMOID_BIAS = -10.0  # SigLIP's and FLAIR's start, about -log of SigLIP's batch of 32k


def sigmoid_bias_start(setting: float | str, global_batch: int | None) -> float:
    """Where a sigmoid loss's bias starts: ``setting`` if a number; ``"auto"``: the log-odds that a
    pair of the batch matches before training, -log(B - 1) for B images each scored against every
    image's texts (the papers' -10 is this at B of about 22k, SigLIP's 32k gives -10.4; 64 gives
    -4.1). Started far below it, the embeddings adapt to the bias faster than it moves
    (docs/method.md, "SigLIP"). With no batch (a model loaded from a checkpoint, whose trained bias
    replaces the start) ``"auto"`` is the papers' -10."""
    if setting != "auto":
        return float(setting)
    if global_batch is None:
        return PAPERS_SIGMOID_BIAS
    return -math.log(max(global_batch - 1, 1))


def one_text_of_every_other_image(batch: int, slots: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B, B]`` slots: entry ``(i, j)`` is which of image j's T texts image i is contrasted with
    (FLAIR's one negative caption per other image; the diagonal is unused). Drawn uniformly from
    ``seed`` alone, so every rank and every micro-batch's pass of a step draws the same."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(slots, (batch, batch), generator=generator).to(device)


def conditioned_cosines(pool, queries: torch.Tensor, patch_emb: torch.Tensor) -> torch.Tensor:
    """FLAIR's text-conditioned score of each query (a normalised text embedding) and its image:
    ``normalise(pool(queries, patch_emb)) . query``, ``[b, Q]`` from ``queries [b, Q, D]``."""
    return (F.normalize(pool(queries, patch_emb), dim=-1) * queries).sum(-1)


def text_conditioned_sigmoid_loss(
    patch_emb: torch.Tensor,
    text_emb: torch.Tensor,
    pool,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    negative_slots: torch.Tensor,
    rows: slice | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """FLAIR's L_tcs: each image pooled by its own texts (positives) and by one text of every other
    image (negatives), each pooled embedding scored against the text that pooled it.

    ``text_emb`` ``[B, T, D]``; ``patch_emb`` ``[b, N, D]``: the patch tokens of images ``rows`` of
    the B (default all); ``pool(queries [b, C, D], patch_emb) -> [b, C, D]``; ``negative_slots``
    ``[B, B]`` (:func:`one_text_of_every_other_image`). Image i's C = T + B - 1 texts t give
    ``x = s normalise(pool(t, i)) . t + bias`` and the term ``-log sigmoid(z x)``, ``z = 1`` for its
    own texts, -1 for the others; FLAIR sums a row's terms over C. The loss is the b rows' sum
    over C, times B / b: a rank's share, whose mean over ranks is the global batch's sum over C.
    Memory: the pooler attends with b C queries over N patches, ``O(b (B + T) N)`` per head, and
    keeps ``O(b C D)`` for the backward pass. With ``chunk`` > 0 it pools ``chunk`` images at a time,
    each chunk recomputed in the backward pass (activation checkpointing): ``O(chunk C (D + N))``
    at once and only the ``[b, C]`` scores kept, for one more pooler forward.
    """
    _check("text_emb", text_emb, 3)
    _check("patch_emb", patch_emb, 3)
    batch, slots, dim = text_emb.shape
    rows = slice(0, batch) if rows is None else rows
    local = patch_emb.shape[0]
    if local != rows.stop - rows.start or patch_emb.shape[-1] != dim or negative_slots.shape != (batch, batch):
        raise ValueError(
            f"patch_emb {tuple(patch_emb.shape)} (rows {rows.start}:{rows.stop}), text_emb {tuple(text_emb.shape)} "
            f"and negative_slots {tuple(negative_slots.shape)} do not pair up"
        )
    mine = torch.arange(rows.start, rows.stop, device=text_emb.device)
    everyone = torch.arange(batch, device=text_emb.device).expand(local, batch)
    others = everyone[everyone != mine.unsqueeze(1)].reshape(local, batch - 1)  # [b, B-1]
    negative_texts = negative_slots[mine.unsqueeze(1), others]

    def scores(first: int, last: int, text_emb: torch.Tensor, patch_emb: torch.Tensor) -> torch.Tensor:
        negatives = text_emb[others[first:last], negative_texts[first:last]]  # [n, B-1, D]
        queries = torch.cat([text_emb[mine[first:last]], negatives], dim=1)  # [n, C, D]: own texts first
        return conditioned_cosines(pool, queries, patch_emb[first:last])

    if chunk <= 0 or chunk >= local:
        cosines = scores(0, local, text_emb, patch_emb)
    else:
        cosines = torch.cat([
            checkpoint(scores, first, min(first + chunk, local), text_emb, patch_emb, use_reentrant=False)
            for first in range(0, local, chunk)
        ])
    logits = inverse_temperature(logit_scale) * cosines + logit_bias  # [b, C]
    signs = torch.ones_like(logits)
    signs[:, slots:] = -1
    columns = slots + batch - 1
    return -F.logsigmoid(signs * logits).sum() / columns * (batch / local)


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
    if torch.is_grad_enabled() and similarity.requires_grad:
        return _PoolingWeights.apply(similarity, threshold)
    weights = torch.empty_like(similarity)
    for block in _blocks(similarity.shape[0]):
        _weights_forward(similarity[block], threshold, weights[block])
    return weights


# The grouping terms run element-wise work over [images, texts, patches] tensors, which as composed
# ops would allocate some 50 tensors of that size per step. The two autograd functions below do the
# same arithmetic a block of images at a time, so the temporaries stay in cache, mostly in place and
# with float masks, and their backward passes are autograd's formulas applied in autograd's order:
# losses and gradients equal the composed ops' to the bit (tests/test_losses.py), so training is unchanged.
_BLOCK = 16  # images per block


def _blocks(size: int) -> list[slice]:
    return [slice(start, min(start + _BLOCK, size)) for start in range(0, size, _BLOCK)]


class _Weights(NamedTuple):
    """What a block's pooling weights need for their backward."""

    low: torch.Tensor  # the similarities' min over the patches
    high: torch.Tensor  # and max
    kept: torch.Tensor  # the min-max normalised similarities, 0 where below the threshold
    total: torch.Tensor  # kept's sum over the patches
    cut: float  # the largest value below the threshold: kept > cut where kept


def _below(threshold: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value below ``threshold`` as ``dtype`` rounds it: ``x >= threshold``
    (the comparison in ``dtype``) is ``x > _below(threshold)``, which ``threshold_`` tests."""
    return torch.nextafter(torch.tensor(threshold, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)).item()


def _weights_forward(similarity: torch.Tensor, threshold: float | None, out: torch.Tensor) -> _Weights:
    """:func:`_pooling_weights` of one block, written to ``out``. Float-only ops: boolean masks cost
    several times more per element on CPU."""
    num_patches = similarity.shape[-1]
    cut = _below(1.0 / num_patches if threshold is None else threshold, similarity.dtype)
    finfo = torch.finfo(similarity.dtype)
    low, high = similarity.amin(dim=-1, keepdim=True), similarity.amax(dim=-1, keepdim=True)
    kept = F.threshold_(torch.sub(similarity, low).div_((high - low).clamp_min(finfo.eps)), cut, 0.0)
    total = kept.sum(dim=-1, keepdim=True)
    # All patches equally similar (spread 0): no patch stands out, so weigh them all equally.
    # (kept / total is +0 on those rows, so adding 1/N there and +0 elsewhere is torch.where's.)
    torch.div(kept, total.clamp_min(finfo.tiny), out=out).add_(torch.where(total > 0, 0.0, 1.0 / num_patches))
    return _Weights(low, high, kept, total, cut)


def _weights_backward(
    grad: torch.Tensor, similarity: torch.Tensor, weights: torch.Tensor, saved: _Weights, out: torch.Tensor, accumulate: bool
) -> None:
    """The gradient through one block's weights (``grad``, overwritten) to its similarities, added
    to ``out`` (``accumulate``) or written there. Autograd's formulas for the ops of the composed
    form (amin, amax, sub, div, mul by the threshold's mask, sum, div, where), each sum over the
    patches in the same order; the masks multiply as 0/1 floats, as autograd's do."""
    low, high, kept, total, cut = saved
    finfo = torch.finfo(similarity.dtype)
    spread = high - low
    grad.mul_((total > 0).to(grad.dtype))
    clamped_total = total.clamp_min(finfo.tiny)
    # kept / clamped_total is the weights wherever the gradient is not 0
    scratch = torch.div(weights, clamped_total).mul_(grad)
    grad_total = torch.where(total >= finfo.tiny, -scratch.sum(dim=-1, keepdim=True), 0.0)
    grad.div_(clamped_total).add_(grad_total)
    torch.ops.aten.threshold_backward.grad_input(grad, kept, cut, grad_input=grad)  # to the normalised similarities
    clamped_spread = spread.clamp_min(finfo.eps)
    torch.div(kept, clamped_spread, out=scratch).mul_(grad)  # kept is the normalised value wherever grad is not 0
    grad_spread = torch.where(spread >= finfo.eps, -scratch.sum(dim=-1, keepdim=True), 0.0)
    grad.div_(clamped_spread)  # to similarity - low
    if accumulate:
        out.add_(grad)
    else:
        out.copy_(grad)
    grad_low = -grad.sum(dim=-1, keepdim=True) - grad_spread
    # amax's, then amin's: shared by the patches at the extreme, each 1 where sign(x - extreme) is 0
    for grad_extreme, at_extreme in ((grad_spread, torch.sub(similarity, high)), (grad_low, torch.sub(low, similarity))):
        at_extreme.sign_().add_(1.0)
        out.add_(at_extreme.mul_(grad_extreme / at_extreme.sum(dim=-1, keepdim=True)))


class _PoolingWeights(torch.autograd.Function):
    """:func:`_pooling_weights` with its gradient to the similarities."""

    @staticmethod
    def forward(ctx, similarity: torch.Tensor, threshold: float | None) -> torch.Tensor:
        weights = torch.empty_like(similarity)
        ctx.blocks = _blocks(similarity.shape[0])
        ctx.weights = [_weights_forward(similarity[block], threshold, weights[block]) for block in ctx.blocks]
        ctx.save_for_backward(similarity, weights)
        return weights

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        similarity, weights = ctx.saved_tensors
        grad_similarity = torch.empty_like(similarity)
        for block, saved in zip(ctx.blocks, ctx.weights):
            _weights_backward(grad[block].clone(), similarity[block], weights[block], saved, grad_similarity[block], False)
        return grad_similarity, None


class _CrossScores(torch.autograd.Function):
    """``t . normalise(sum_n w_n p_n)`` from the similarities ``[C, M, N]`` of M texts to the N
    patches of each of C images and the patches' Gram matrices ``[C, N, N]``: ``[C, M]``."""

    @staticmethod
    def forward(ctx, similarity: torch.Tensor, gram: torch.Tensor, threshold: float | None, weights_grad: bool) -> torch.Tensor:
        # t . normalise(sum_n w_n p_n) without the [C, M, D] pooled embeddings: the dot product is
        # sum_n w_n (t . p_n) and the squared norm w^T (P P^T) w, so memory is O(C M N), not O(C M D).
        weights = torch.empty_like(similarity)
        blocks = _blocks(similarity.shape[0])
        saved = [_weights_forward(similarity[block], threshold, weights[block]) for block in blocks]
        weighted_gram = weights @ gram
        pooled_dot_text = similarity.new_empty(similarity.shape[:-1])
        squared_norm = similarity.new_empty(similarity.shape[:-1])
        for block in blocks:
            torch.sum(weights[block] * similarity[block], dim=-1, out=pooled_dot_text[block])
            torch.sum(weighted_gram[block] * weights[block], dim=-1, out=squared_norm[block])
        pooled_norm = squared_norm.clamp_min(1e-24).sqrt()  # F.normalize's eps, squared
        scores = pooled_dot_text / pooled_norm
        ctx.blocks, ctx.weights, ctx.weights_grad = blocks, saved, weights_grad
        ctx.save_for_backward(similarity, gram, weights, weighted_gram, squared_norm, pooled_norm, scores)
        return scores

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        similarity, gram, weights, weighted_gram, squared_norm, pooled_norm, scores = ctx.saved_tensors
        grad_dot = (grad / pooled_norm).unsqueeze(-1)
        grad_norm = -grad * (scores / pooled_norm)
        grad_squared = torch.where(squared_norm >= 1e-24, grad_norm / (2 * pooled_norm), 0.0).unsqueeze(-1)
        grad_weighted_gram = grad_squared * weights
        grad_gram = weights.transpose(1, 2).bmm(grad_weighted_gram)
        # Laid out [C, N, M] as the product the similarities are a view of (matmul computes patches @ texts^T), so its backward reads it without a copy.
        grad_similarity = similarity.new_empty(similarity.shape[0], similarity.shape[2], similarity.shape[1]).transpose(1, 2)
        if not ctx.weights_grad:
            torch.mul(grad_dot, weights, out=grad_similarity)
            return grad_similarity, grad_gram, None, None
        grad_weights = grad_weighted_gram.bmm(gram.transpose(1, 2))
        for block, saved in zip(ctx.blocks, ctx.weights):
            # The weights' three uses, their gradients summed in autograd's order.
            grad_block = grad_weights[block].add_(grad_squared[block] * weighted_gram[block])
            grad_block.add_(grad_dot[block] * similarity[block])
            grad_similarity_block = grad_dot[block] * weights[block]  # similarity's layout, for the element-wise work
            _weights_backward(grad_block, similarity[block], weights[block], saved, grad_similarity_block, True)
            grad_similarity[block] = grad_similarity_block
        return grad_similarity, grad_gram, None, None


def _cross_scores(text_emb: torch.Tensor, patch_emb: torch.Tensor, threshold: float | None, weights_grad: bool) -> torch.Tensor:
    """``t_bk . g(t_bk, c)`` for every text ``(b, k)`` of ``text_emb`` ``[B, K, D]`` and every image ``c``
    of ``patch_emb`` ``[C, N, D]``: ``[C images, B texts, K slots]``."""
    batch, slots, dim = text_emb.shape
    similarity = text_emb.reshape(1, batch * slots, dim) @ patch_emb.transpose(1, 2)  # [C images, B*K texts, N]
    gram = patch_emb @ patch_emb.transpose(1, 2)  # [C, N, N]
    return _CrossScores.apply(similarity, gram, threshold, weights_grad).reshape(patch_emb.shape[0], batch, slots)


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
    scale = inverse_temperature(logit_scale)
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
    logits = inverse_temperature(logit_scale) * tokens @ grouped.transpose(1, 2)  # [text, token, grouped token]
    logits_xy = logits.masked_fill(~keep, -torch.inf)
    logits_yx = logits.transpose(1, 2).masked_fill(~keep, -torch.inf)
    counts = valid.sum(dim=-1, keepdim=True)
    contributing = counts >= 2
    row_weights = (valid & contributing).to(logits.dtype) / counts.clamp_min(1) / contributing.sum().clamp_min(1)
    target = torch.arange(length, device=token_emb.device)
    return _symmetric_cross_entropy(logits_xy, logits_yx, target, row_weights)


def grouping_pairs(text_emb: torch.Tensor, grouped: torch.Tensor, negatives: Negatives) -> tuple[torch.Tensor, torch.Tensor]:
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
    x, y = grouping_pairs(text_emb, grouped, negatives)
    return paired_infonce(x, y, inverse_temperature(logit_scale))


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
