"""Image-text retrieval with several captions per image (the CLIP-paper protocol, as clip_benchmark).

* text-to-image R@k: the share of texts whose own image ranks in the top k of all images;
* image-to-text R@k: the share of images with at least one of their texts in the top k of all
  texts.

Texts longer than the context are handled by ``long_text`` ("truncate" at CLIP's 77 tokens,
"full" up to the model's context, or "sentences", see :func:`dreamlip.eval.encode.encode_texts`);
the policy, the context it encoded at and the number of texts it applied to are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .conditioned import conditioned_retrieval
from .datasets import RetrievalSet, read_retrieval
from .encode import LONG_TEXT_POLICIES, EvalContext, LongText, context_length, encode_images, encode_texts

__all__ = ["RetrievalTask", "ranked_retrieval_metrics", "retrieval_metrics"]


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """R@k in both directions (percent) from normalised embeddings; ``text_image[j]`` is the index
    of text ``j``'s image. Works in chunks so the full similarity matrix is never held."""
    return ranked_retrieval_metrics(
        lambda start, stop: image_emb[start:stop] @ text_emb.T,
        lambda start, stop: text_emb[start:stop] @ image_emb.T,
        len(image_emb), len(text_emb), text_image, ks, chunk,
    )


def ranked_retrieval_metrics(
    image_rows: Callable[[int, int], torch.Tensor],
    text_rows: Callable[[int, int], torch.Tensor],
    n_images: int,
    n_texts: int,
    text_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """R@k in both directions (percent) from scores: ``image_rows(a, b)`` gives images a..b-1
    against every text ``[b - a, n_texts]``, ``text_rows(a, b)`` texts a..b-1 against every image;
    asked for ``chunk`` rows at a time."""
    text_image = text_image.long()
    top_images = min(max(ks), n_images)
    top_texts = min(max(ks), n_texts)
    # Rank of each text's image, and the best rank among each image's texts (inf: none in top k).
    t2i_rank = torch.empty(n_texts)
    for start in range(0, n_texts, chunk):
        ranked = text_rows(start, min(start + chunk, n_texts)).topk(top_images, dim=1).indices
        hit = ranked == text_image[start : start + chunk, None]
        t2i_rank[start : start + chunk] = torch.where(hit.any(1), hit.float().argmax(1).float(), torch.inf)
    i2t_rank = torch.empty(n_images)
    for start in range(0, n_images, chunk):
        ranked = image_rows(start, min(start + chunk, n_images)).topk(top_texts, dim=1).indices
        owner = torch.arange(start, min(start + chunk, n_images))
        hit = text_image[ranked] == owner[:, None]
        i2t_rank[start : start + chunk] = torch.where(hit.any(1), hit.float().argmax(1).float(), torch.inf)
    metrics = {}
    for k in ks:
        metrics[f"image_to_text_R@{k}"] = 100.0 * (i2t_rank < k).double().mean().item()
    for k in ks:
        metrics[f"text_to_image_R@{k}"] = 100.0 * (t2i_rank < k).double().mean().item()
    return metrics


@dataclass
class RetrievalTask:
    """Retrieval over ``data`` (see :func:`read_retrieval` for layouts and ``texts``)."""

    data: str | Path
    images: str | Path | None = None  # image root for Karpathy / {image, caption} files
    split: str = "test"
    texts: str = "texts"
    long_text: LongText = "truncate"
    ks: Sequence[int] = (1, 5, 10)
    name: str = "retrieval"
    _dataset: RetrievalSet | None = field(default=None, init=False, repr=False)
    _context_length: int | None = field(default=None, init=False, repr=False)  # known once run

    def __post_init__(self) -> None:
        if self.long_text not in LONG_TEXT_POLICIES:
            raise ValueError(f"long_text must be one of {LONG_TEXT_POLICIES}, got {self.long_text!r}")

    @property
    def dataset(self) -> RetrievalSet:
        if self._dataset is None:
            self._dataset = read_retrieval(self.data, images=self.images, split=self.split, texts=self.texts)
        return self._dataset

    def run(self, ctx: EvalContext) -> dict[str, float]:
        data = self.dataset
        texts = [t for group in data.texts for t in group]
        text_image = torch.tensor([i for i, group in enumerate(data.texts) for _ in group])
        image_emb = encode_images(ctx, data.images, desc=self.name)
        text_emb, n_long = encode_texts(ctx, texts, self.long_text, desc=f"{self.name} texts")
        self._context_length = context_length(ctx, self.long_text)
        metrics = retrieval_metrics(image_emb, text_emb, text_image, self.ks)
        if ctx.conditioning is not None:
            conditioned = conditioned_retrieval(ctx, ctx.conditioning, data.images, image_emb, text_emb, text_image, self.ks,
                                                desc=f"{self.name} conditioned")
            metrics |= {f"conditioned_{key}": value for key, value in conditioned.items()}
        return {
            **metrics,
            "n_images": float(len(data.images)),
            "n_texts": float(len(texts)),
            "n_long_texts": float(n_long),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "task": "retrieval",
            "name": self.name,
            "data": self.dataset.source,
            "texts": self.texts,
            "long_text": self.long_text,
            "context_length": self._context_length,  # tokens the texts were encoded with (None before a run)
        }
