"""Evaluation by text-conditioned image embeddings, FLAIR's way (arXiv 2412.03561, section 4).

A model trained with a text-conditioned pooler (``loss.objective=flair``) scores an image and a text
as the cosine between the text's embedding and the image's patch tokens pooled with that text as
the query: ``s(i, t) = normalise(pool(t, patches_i)) . t``, the score its ``L_tcs`` trains. The
pooler runs once per (image, text) pair, so these scores cost far more than a dot product of global
embeddings: :class:`Conditioning` chooses all pairs, or FLAIR's re-ranking of the top k global
matches, and bounds the memory of each pooler call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from dreamlip._compat import PortableTransform
from dreamlip.losses import conditioned_cosines

from .datasets import ImageSource
from .encode import EvalContext, EvalLoader, _Images

__all__ = ["CONDITIONED_MODES", "Conditioning", "conditioned_classification", "conditioned_retrieval", "conditioned_scores"]

CONDITIONED_MODES = ("all", "topk")
# Below every cosine: what a pair outside the re-ranked top k scores, minus its global similarity,
# so it ranks after every re-ranked pair and, among the others, in the global order.
_UNRANKED = 3.0


@dataclass(frozen=True)
class Conditioning:
    """How to score by text-conditioned image embeddings.

    ``mode="all"``: every image with every text (FLAIR's ``--inference-with-flair``); ``"topk"``:
    each image's top ``k`` texts and each text's top ``k`` images by global similarity are
    re-scored by the pooler and ranked first (FLAIR's ``--inference-with-flair-topk``, whose
    released code re-ranks image-to-text only), the rest follow in global order. ``chunk`` bounds
    one pooler call: at most that many query and patch tokens together (a few rows of one image's
    texts), so its memory is ``O(chunk D + heads chunk N)`` whatever the number of pairs.
    """

    pooler: nn.Module
    mode: Literal["all", "topk"] = "topk"
    k: int = 128
    chunk: int = 16384

    def __post_init__(self) -> None:
        if self.mode not in CONDITIONED_MODES:
            raise ValueError(f"conditioned mode must be one of {CONDITIONED_MODES}, got {self.mode!r}")
        if self.k < 1 or self.chunk < 1:
            raise ValueError(f"conditioned k and chunk must be at least 1, got {self.k} and {self.chunk}")


@torch.no_grad()
def conditioned_scores(
    pooler: nn.Module, patches: torch.Tensor, texts: torch.Tensor, candidates: Sequence[torch.Tensor], chunk: int
) -> list[torch.Tensor]:
    """``s(i, t)`` for image ``i`` of ``patches`` ``[b, N, D]`` and each text index in
    ``candidates[i]`` (rows of ``texts`` ``[T, D]``, normalised): a list of ``[len(candidates[i])]``.

    Each image's texts are cut into segments of ``width`` queries, and each pooler call takes as
    many segments (zero-padded, each with its image's patches) as fit ``chunk`` query and patch
    tokens; at least one. A query attends on its own, so padding changes no score.
    """
    n_patches = patches.shape[1]
    longest = max((len(c) for c in candidates), default=0)
    width = max(1, min(longest, chunk - n_patches))
    segments = [(image, start) for image, c in enumerate(candidates) for start in range(0, len(c), width)]
    rows_per_call = max(1, chunk // (width + n_patches))
    scores = [torch.empty(len(c), dtype=texts.dtype, device=texts.device) for c in candidates]
    for first in range(0, len(segments), rows_per_call):
        group = segments[first : first + rows_per_call]
        index = torch.zeros(len(group), width, dtype=torch.long, device=texts.device)
        lengths = []
        for row, (image, start) in enumerate(group):
            ids = candidates[image][start : start + width]
            index[row, : len(ids)] = ids
            lengths.append(len(ids))
        queries = texts[index]  # [rows, width, D]
        images = torch.tensor([image for image, _ in group], device=patches.device)
        row_scores = conditioned_cosines(pooler, queries, patches[images])
        for row, ((image, start), length) in enumerate(zip(group, lengths, strict=True)):
            scores[image][start : start + length] = row_scores[row, :length]
    return scores


@torch.no_grad()
def _score_images(
    ctx: EvalContext, conditioning: Conditioning, sources: Sequence[ImageSource], texts: torch.Tensor,
    candidates: Callable[[int, int], list[torch.Tensor]], desc: str,
) -> list[torch.Tensor]:
    """The images' patch tokens, one loader batch at a time (never all held), scored against
    ``candidates(start, stop)``: those batch images' text indices. Scores on the CPU."""
    loader = EvalLoader(_Images(sources, PortableTransform(ctx.transform)), batch_size=ctx.batch_size, num_workers=ctx.workers)
    texts = texts.to(ctx.device)
    scores: list[torch.Tensor] = []
    for images in tqdm(loader, desc=desc, unit="batch", disable=not ctx.progress, leave=False):
        _, patches = ctx.model.encode_image(images.to(ctx.device), with_patches=True)
        wanted = [c.to(ctx.device) for c in candidates(len(scores), len(scores) + len(images))]
        scores += [s.float().cpu() for s in conditioned_scores(conditioning.pooler, patches.float(), texts, wanted, conditioning.chunk)]
    return scores


def conditioned_retrieval(
    ctx: EvalContext, conditioning: Conditioning, sources: Sequence[ImageSource], image_emb: torch.Tensor,
    text_emb: torch.Tensor, text_image: torch.Tensor, ks: Sequence[int], desc: str = "conditioned",
) -> dict[str, float]:
    """Retrieval R@k (as :func:`dreamlip.eval.retrieval.retrieval_metrics`) by text-conditioned
    scores; ``image_emb`` and ``text_emb`` are the global embeddings, which choose the top k."""
    from .retrieval import ranked_retrieval_metrics

    n_images, n_texts = len(image_emb), len(text_emb)
    if conditioning.mode == "all":
        every = torch.arange(n_texts)
        rows = torch.stack(_score_images(ctx, conditioning, sources, text_emb, lambda a, b: [every] * (b - a), desc))
        return ranked_retrieval_metrics(lambda a, b: rows[a:b], lambda a, b: rows[:, a:b].T, n_images, n_texts, text_image, ks)

    k_texts, k_images = min(conditioning.k, n_texts), min(conditioning.k, n_images)
    image_top = _top(image_emb, text_emb, k_texts)  # [I, k]: each image's texts to re-rank
    text_top = _top(text_emb, image_emb, k_images)  # [T, k]: each text's images
    # Each pair scored once: per image, the union of its top texts and the texts that have it on top.
    keys = torch.cat([
        (torch.arange(n_images)[:, None] * n_texts + image_top).flatten(),
        (text_top * n_texts + torch.arange(n_texts)[:, None]).flatten(),
    ]).unique()  # sorted: by image, then text
    owners = keys // n_texts
    starts = torch.searchsorted(owners, torch.arange(n_images + 1))
    per_image = [keys[starts[i] : starts[i + 1]] % n_texts for i in range(n_images)]
    scores = torch.cat(_score_images(ctx, conditioning, sources, text_emb, lambda a, b: per_image[a:b], desc))

    def lookup(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        return scores[torch.searchsorted(keys, images * n_texts + texts)]

    def image_rows(start: int, stop: int) -> torch.Tensor:
        block = image_emb[start:stop] @ text_emb.T - _UNRANKED
        images = torch.arange(start, stop)[:, None].expand(-1, k_texts)
        return block.scatter_(1, image_top[start:stop], lookup(images, image_top[start:stop]))

    def text_rows(start: int, stop: int) -> torch.Tensor:
        block = text_emb[start:stop] @ image_emb.T - _UNRANKED
        texts = torch.arange(start, stop)[:, None].expand(-1, k_images)
        return block.scatter_(1, text_top[start:stop], lookup(text_top[start:stop], texts))

    return ranked_retrieval_metrics(image_rows, text_rows, n_images, n_texts, text_image, ks)


def _top(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Each query's ``k`` best keys by global similarity, ``[Q, k]``, a chunk of queries at a time."""
    return torch.cat([(queries[s : s + chunk] @ keys.T).topk(k, dim=1).indices for s in range(0, len(queries), chunk)])


def conditioned_classification(
    ctx: EvalContext, conditioning: Conditioning, sources: Sequence[ImageSource], class_emb: torch.Tensor, desc: str = "conditioned"
) -> torch.Tensor:
    """Zero-shot logits ``[I, C]``: each image pooled by every class embedding (the renormalised mean
    of its prompts' embeddings) and scored against it. Every class is scored, whatever the mode."""
    every = torch.arange(len(class_emb))
    return torch.stack(_score_images(ctx, conditioning, sources, class_emb, lambda a, b: [every] * (b - a), desc))
