"""What every task shares: the run context, batched image and text encoding, class prompts.

The model is anything with DreamLIPModel's interface: ``encode_image(images, with_patches)``
returning normalised ``([B, D], [B, N, D] | None)`` and ``encode_text(tokens [..., L])`` returning
normalised ``[..., D]``. Plain open_clip models are wrapped in :class:`DreamLIPModel` by
:func:`dreamlip.eval.evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dreamlip.captions import split_sentences

from .datasets import ImageSource, Templates, load_image

__all__ = [
    "EvalContext",
    "LONG_TEXT_POLICIES",
    "class_embeddings",
    "encode_images",
    "encode_texts",
    "format_prompt",
]

LONG_TEXT_POLICIES = ("truncate", "sentences")
LongText = Literal["truncate", "sentences"]


@dataclass
class EvalContext:
    model: Any
    tokenizer: Callable
    transform: Callable  # the model's eval image transform (PIL -> tensor)
    device: torch.device
    batch_size: int = 64
    workers: int = 0
    progress: bool = True


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
    loader = DataLoader(_Images(sources, ctx.transform), batch_size=ctx.batch_size, num_workers=ctx.workers)
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


@torch.no_grad()
def encode_texts(
    ctx: EvalContext, texts: Sequence[str], long_text: LongText = "truncate", desc: str = "texts"
) -> tuple[torch.Tensor, int]:
    """Normalised embeddings ``[N, D]`` (on the CPU) and how many texts exceeded the context.

    A text that fits the tokenizer's context is encoded whole under either policy. One that does
    not is, with ``"truncate"``, cut at the context (open_clip's tokenizer keeps the end marker);
    with ``"sentences"``, split by :func:`dreamlip.captions.split_sentences`, each sentence
    encoded (and truncated if it alone is too long), the normalised sentence embeddings averaged
    and the mean renormalised.
    """
    if long_text not in LONG_TEXT_POLICIES:
        raise ValueError(f"long_text must be one of {LONG_TEXT_POLICIES}, got {long_text!r}")
    context = getattr(ctx.tokenizer, "context_length", 77)
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
        tokens = ctx.tokenizer(pieces[start : start + ctx.batch_size]).to(ctx.device)
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
