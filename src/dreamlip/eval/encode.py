"""What every task shares: the run context, batched image and text encoding, class prompts.

The model is anything with DreamLIPModel's interface: ``encode_image(images, with_patches)``
returning normalised ``([B, D], [B, N, D] | None)`` and ``encode_text(tokens [..., L])`` returning
normalised ``[..., D]``. Plain open_clip models are wrapped in :class:`DreamLIPModel` by
:func:`dreamlip.eval.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from dreamlip._compat import PortableTransform
from dreamlip.captions import split_sentences

from .datasets import EvalDataError, ImageSource, Templates, load_image

__all__ = [
    "EvalContext",
    "EvalLoader",
    "CLIP_CONTEXT",
    "LONG_TEXT_POLICIES",
    "class_embeddings",
    "context_length",
    "encode_images",
    "encode_texts",
    "format_prompt",
]

LONG_TEXT_POLICIES = ("truncate", "sentences", "full")
LongText = Literal["truncate", "sentences", "full"]
CLIP_CONTEXT = 77  # CLIP's text context, which the published zero-shot and retrieval numbers use


@dataclass
class EvalContext:
    model: Any
    tokenizer: Callable
    transform: Callable  # the model's eval image transform (PIL -> tensor)
    device: torch.device
    batch_size: int = 64
    workers: int = 0
    progress: bool = True
    conditioning: Any = None  # a dreamlip.eval.conditioned.Conditioning: also score by text-conditioned embeddings


class _Failed(NamedTuple):
    message: str


class _ErrorsAsValues(Dataset):
    """``dataset`` whose EvalDataError is returned, not raised, so it can cross from a worker."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except EvalDataError as err:
            return _Failed(str(err))


class _CollateUnlessFailed:
    """The batch as ``collate`` makes it, or the first failure in it."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, items: list) -> Any:
        return next((item for item in items if isinstance(item, _Failed)), None) or self.collate(items)


class EvalLoader(DataLoader):
    """A DataLoader whose dataset's EvalDataError (a missing or truncated image, a bad mask)
    reaches the caller as that one-line error: raised in a worker, torch would re-raise it
    wrapped in the worker's traceback."""

    def __init__(self, dataset: Dataset, *, collate_fn: Callable[[list], Any] | None = None, **options: Any):
        super().__init__(_ErrorsAsValues(dataset), collate_fn=_CollateUnlessFailed(collate_fn or default_collate), **options)

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if isinstance(batch, _Failed):
                raise EvalDataError(batch.message)
            yield batch


class _Images(Dataset):
    def __init__(self, sources: Sequence[ImageSource], transform: Callable):
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(load_image(self.sources[index]))


@torch.no_grad()
def encode_images(ctx: EvalContext, sources: Sequence[ImageSource], desc: str) -> torch.Tensor:
    """Normalised global embeddings ``[N, D]`` (on the CPU) of the images, in order."""
    loader = EvalLoader(_Images(sources, PortableTransform(ctx.transform)), batch_size=ctx.batch_size, num_workers=ctx.workers)
    chunks = []
    for images in tqdm(loader, desc=desc, unit="batch", disable=not ctx.progress, leave=False):
        embeddings, _ = ctx.model.encode_image(images.to(ctx.device))
        chunks.append(embeddings.float().cpu())
    return torch.cat(chunks)


def _token_count(tokenizer: Callable, text: str) -> int:
    """Tokens the text needs with its start and end markers."""
    if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer: BPE ids without markers
        return len(tokenizer.encode(text)) + 2
    # Other tokenizers pad with 0 after the end marker; a full row means the text filled or overflowed it.
    row = tokenizer([text])[0]
    return int((row != 0).sum()) + (1 if bool(row[-1] != 0) else 0)


def context_length(ctx: EvalContext, long_text: LongText) -> int:
    """Tokens a policy encodes a text with: the model's context (its tokenizer's if the model
    does not say) for ``"full"`` and ``"sentences"``; at most CLIP's 77 for ``"truncate"``, so a
    long-context model is also scored as the 77-token baselines are."""
    context = getattr(ctx.model, "context_length", None) or getattr(ctx.tokenizer, "context_length", CLIP_CONTEXT)
    return min(context, CLIP_CONTEXT) if long_text == "truncate" else context


def _tokenize(tokenizer: Callable, texts: list[str], context: int) -> torch.Tensor:
    if getattr(tokenizer, "context_length", context) == context:
        return tokenizer(texts)
    return tokenizer(texts, context_length=context)  # open_clip's tokenizers take it per call


@torch.no_grad()
def encode_texts(
    ctx: EvalContext, texts: Sequence[str], long_text: LongText = "truncate", desc: str = "texts"
) -> tuple[torch.Tensor, int]:
    """Normalised embeddings ``[N, D]`` (on the CPU) and how many texts exceeded the context.

    The context is :func:`context_length`: 77 tokens (with start and end markers) for
    ``"truncate"``, the model's own for ``"full"`` and ``"sentences"``; for CLIP's 77-token
    models all three agree on what fits. A text that fits is encoded whole under every policy.
    One that does not is, with ``"truncate"`` or ``"full"``, cut at the context (open_clip's
    tokenizer keeps the end marker); with ``"sentences"``, split by
    :func:`dreamlip.captions.split_sentences`, each sentence encoded (and cut if it alone is too
    long), the normalised sentence embeddings averaged and the mean renormalised.
    """
    if long_text not in LONG_TEXT_POLICIES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_POLICIES}, got {long_text!r}")
    context = context_length(ctx, long_text)
    pieces: list[str] = []
    owner: list[int] = []
    n_long = 0
    for i, text in enumerate(texts):
        too_long = _token_count(ctx.tokenizer, text) > context
        n_long += too_long
        parts = (split_sentences(text) or [text]) if too_long and long_text == "sentences" else [text]
        pieces += parts
        owner += [i] * len(parts)
    chunks = []
    starts = range(0, len(pieces), ctx.batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not ctx.progress, leave=False):
        tokens = _tokenize(ctx.tokenizer, pieces[start : start + ctx.batch_size], context).to(ctx.device)
        chunks.append(ctx.model.encode_text(tokens).float().cpu())
    embeddings = torch.cat(chunks)
    if len(pieces) == len(texts):
        return embeddings, n_long
    pooled = torch.zeros(len(texts), embeddings.shape[1]).index_add_(0, torch.tensor(owner), embeddings)
    return F.normalize(pooled, dim=-1), n_long


def format_prompt(template: str, name: str) -> str:
    """Fill a template written with ``{}`` (open_clip) or ``{c}`` (clip_benchmark)."""
    return template.replace("{c}", "{}").format(name)


def class_embeddings(ctx: EvalContext, classnames: Sequence[str], templates: Templates) -> torch.Tensor:
    """One normalised embedding per class ``[C, D]``: the mean of its normalised prompt
    embeddings, renormalised (CLIP's prompt ensembling). ``templates`` is a list applied to every
    class, or a ``{class: [prompts]}`` dict of class-specific prompts."""
    prompts = []
    for name in classnames:
        if isinstance(templates, dict):
            if not templates.get(name):
                raise ValueError(f"class-specific prompts name no prompts for class {name!r}")
            prompts.append(list(templates[name]))
        else:
            prompts.append([format_prompt(t, name) for t in templates])
    flat = [p for group in prompts for p in group]
    embeddings, _ = encode_texts(ctx, flat, desc="class prompts")
    owner = torch.tensor([c for c, group in enumerate(prompts) for _ in group])
    summed = torch.zeros(len(classnames), embeddings.shape[1]).index_add_(0, owner, embeddings)
    return F.normalize(summed, dim=-1)
