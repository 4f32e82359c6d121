"""Long captions in, per-image text slots out: sentence splitting and sub-caption sampling.

Every time a sample is loaded, DreamLIP draws K sub-captions for its image from a pool made of the
sentences of all long captions and all short captions (docs/method.md, "Sub-caption sampling").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Literal, Mapping, Sequence, get_args

import nupunkt
import numpy as np

__all__ = [
    "NoUsableTextError",
    "SubcaptionSampler",
    "caption_text",
    "has_word",
    "join_sentences",
    "merge_items",
    "split_sentences",
]

# Hard breaks the sentence model must not have to guess: newlines and the LLM end-of-sequence tag
# that leaks into some released captions.
_HARD_BREAK = re.compile(r"\s*(?:</s>|\r?\n|\r)\s*")
# "1. ", "2) ", "- ", "* ", "• " at the start of a list item: markup, not words.
_LIST_MARKER = re.compile(r"^\s*(?:[-*•·]+|\(?\d{1,3}[.)]|\(?[a-zA-Z][.)](?=\s))\s+")
# An inline numbered list ("... are: 1. a dog 2. a cat") is split before each number.
_INLINE_NUMBER = re.compile(r"(?<=[.:;!?])\s+(?=\d{1,3}[.)]\s)")
_HAS_WORD = re.compile(r"\w")
_CLOSERS = ".!?\"')»…:;"
LongMode = Literal["sentences", "whole", "sentences+whole", "none"]
LONG_MODES: tuple[str, ...] = get_args(LongMode)
Sampling = Literal["subcaptions", "flair"]
SAMPLINGS: tuple[str, ...] = get_args(Sampling)


@lru_cache(maxsize=200_000)
def _split_cached(text: str) -> tuple[str, ...]:
    sentences: list[str] = []
    for block in _HARD_BREAK.split(text):
        for piece in _INLINE_NUMBER.split(block):
            for sentence in nupunkt.sent_tokenize(piece):
                sentence = _LIST_MARKER.sub("", sentence).strip()
                if _HAS_WORD.search(sentence):
                    sentences.append(sentence)
    return tuple(sentences)


def split_sentences(text: str | Sequence[str] | None) -> list[str]:
    """Split a caption into sentences.

    Newlines and ``</s>`` always end a sentence; inside a line a trained Punkt model (nupunkt)
    decides, so abbreviations ("e.g.", "Mr.", "U.S.") and decimals ("3.5 m") stay whole. List
    markers ("1.", "-", "•") are stripped and pieces with no word character are dropped.
    Results are cached: the same caption is split once per process, not once per epoch.

    A list is a caption split already (``dreamlip prepare``'s shards, FLAIR's pre-split ones): its
    pieces are the sentences as they are, stripped, without those that hold no word character.
    """
    if not text:
        return []
    if not isinstance(text, str):
        return [piece.strip() for piece in text if isinstance(piece, str) and _HAS_WORD.search(piece)]
    return list(_split_cached(text))


def join_sentences(pieces: Sequence[str]) -> str:
    """Pre-split pieces back into one text, joined with spaces. Some splitters (FLAIR's) cut at "."
    and drop it: when no piece ends with a period, each piece without closing punctuation gets its
    period back. Pieces from :func:`split_sentences` keep theirs and are joined as they are."""
    pieces = [piece.strip() for piece in pieces if isinstance(piece, str) and piece.strip()]
    if len(pieces) <= 1 or any(piece.endswith(".") for piece in pieces):
        return " ".join(pieces)
    return " ".join(piece if piece[-1] in _CLOSERS else piece + "." for piece in pieces)


def has_word(text: str) -> bool:
    """Whether ``text`` holds a word character: texts without one are never trained on."""
    return _HAS_WORD.search(text) is not None


def caption_text(value: Any) -> str:
    """A caption as one string, whether stored whole or pre-split into sentences."""
    return join_sentences(value) if isinstance(value, (list, tuple)) else _as_text(value)


class NoUsableTextError(ValueError):
    """An image has neither a raw caption nor any generated caption with a sentence in it."""


def merge_items(texts: Sequence[str]) -> str:
    """Pool items merged into one text (FLAIR's merged captions, COSMOS's global text crops): each
    is a text of its own (a sentence, a short caption), so each is closed with a period unless it
    ends with closing punctuation already; one item stays as it is."""
    texts = [text.strip() for text in texts]
    if len(texts) == 1:
        return texts[0]
    return " ".join(text if text[-1] in _CLOSERS else text + "." for text in texts)


def _flair_texts(pool: Sequence[str], k: int, max_merge: int, rng: np.random.Generator) -> list[str]:
    """FLAIR's caption sampling (its ``data.py``, ``sample_dict``): each of the ``k`` texts merges
    m ~ U{1..max_merge} pool items; m = 1 is one uniform pick; otherwise, with probability 1/2,
    m consecutive items (a uniform window; the whole pool when it has at most m items), else m
    items at uniform positions (distinct when the pool has at least m, in the order drawn)."""
    n = len(pool)
    texts = []
    for _ in range(k):
        merged = int(rng.integers(1, max_merge + 1))
        if merged == 1:
            texts.append(pool[rng.integers(n)])
        elif rng.random() < 0.5:
            start = int(rng.integers(max(n - merged, 0) + 1))
            texts.append(merge_items(pool[start : start + merged]))
        else:
            texts.append(merge_items([pool[i] for i in rng.choice(n, size=merged, replace=n < merged)]))
    return texts


def _merge_consecutive(sentences: Sequence[str], merge: int, join: Callable[[Sequence[str]], str]) -> list[str]:
    if merge <= 1:
        return list(sentences)
    return [join(sentences[i : i + merge]) for i in range(0, len(sentences), merge)]


@dataclass(frozen=True)
class SubcaptionSampler:
    """Draws the ``K + 1`` texts of one image.

    Slot 0 is the raw caption (alt-text); slots 1..K are drawn uniformly from the pool, without
    replacement when the pool has at least K items and with replacement otherwise.

    Args:
        k: number of sub-caption slots (0 gives plain CLIP: the raw caption only).
        long_mode: ``"sentences"`` puts every sentence of every long caption in the pool (DreamLIP);
            ``"whole"`` puts each long caption in as one text (the paper's "long caption as one
            text" ablation); ``"sentences+whole"`` puts in both, so the model sees long texts as
            well as sentences (Long-CLIP's and FLAIR's point: a model trained on short texts only
            loses long-text retrieval); ``"none"`` leaves long captions out.
        use_short: put the captioners' short captions in the pool.
        merge: join ``merge`` consecutive sentences of a long caption into one pool item.
        sampling: how slots 1..K are drawn from the pool: ``"subcaptions"`` (DreamLIP's) picks K
            items; ``"flair"`` (FLAIR's) makes each slot a merge of 1 to ``max_merge`` items, of
            consecutive items or of items at random positions (:func:`_flair_texts`).
        max_merge: the most pool items one slot merges under ``sampling="flair"`` (FLAIR's 3).
        seed: base seed; the draw for a sample depends only on (seed, epoch, index), so resumed
            runs, DDP ranks and dataloader workers all reproduce the same texts.
    """

    k: int = 6
    long_mode: LongMode = "sentences"
    use_short: bool = True
    merge: int = 1
    sampling: Sampling = "subcaptions"
    max_merge: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.merge < 1:
            raise ValueError(f"merge must be >= 1, got {self.merge}")
        if self.long_mode not in LONG_MODES:
            raise ValueError(f"long_mode must be one of {', '.join(map(repr, LONG_MODES))}, got {self.long_mode!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(map(repr, SAMPLINGS))}, got {self.sampling!r}")
        if self.max_merge < 1:
            raise ValueError(f"max_merge must be >= 1, got {self.max_merge}")
        if self.sampling == "flair" and self.merge != 1:
            raise ValueError(f"merge={self.merge} with sampling='flair', which merges 1 to max_merge items itself: set merge=1")

    @property
    def num_texts(self) -> int:
        return self.k + 1

    def pool(self, captions: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
        """The pool for one image from ``{captioner: {"short": text, "long": text}}``; a text is a
        string or a list of its sentences (split already: see :func:`split_sentences`)."""
        items: list[str] = []
        for by_length in (captions or {}).values():
            long_value = by_length.get("long")
            presplit = isinstance(long_value, (list, tuple))
            sentences = split_sentences(long_value if presplit else _as_text(long_value)) if self.long_mode != "none" else []
            join = join_sentences if presplit else " ".join
            parts = _merge_consecutive(sentences, self.merge, join) if "sentences" in self.long_mode else []
            items.extend(parts)
            whole = join(sentences)
            # a caption that is one part already (one sentence, or at most `merge`) goes in once
            if "whole" in self.long_mode and _HAS_WORD.search(whole) and parts != [whole]:
                items.append(whole)
            short_text = caption_text(by_length.get("short"))
            if self.use_short and _HAS_WORD.search(short_text):
                items.append(short_text.strip())
        return items

    def sample(
        self,
        raw_caption: str | None,
        captions: Mapping[str, Mapping[str, Any]] | None,
        *,
        index: int,
        epoch: int = 0,
    ) -> list[str]:
        """Return ``k + 1`` texts; raises :class:`NoUsableTextError` if the image has no text."""
        raw = caption_text(raw_caption).strip()
        pool = self.pool(captions) if self.k > 0 or not _HAS_WORD.search(raw) else []
        rng = np.random.default_rng((self.seed, epoch, index))
        if not _HAS_WORD.search(raw):
            if not pool:
                raise NoUsableTextError("no raw caption and no generated caption with a sentence")
            raw = pool[rng.integers(len(pool))]
        if self.k == 0:
            return [raw]
        # An image with a raw caption but nothing generated still trains: its slots repeat it.
        pool = pool or [raw]
        if self.sampling == "flair":
            return [raw] + _flair_texts(pool, self.k, self.max_merge, rng)
        picks = rng.choice(len(pool), size=self.k, replace=len(pool) < self.k)
        return [raw] + [pool[i] for i in picks]


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value != value:  # NaN from pandas-read CSVs
        return ""
    return value if isinstance(value, str) else str(value)
