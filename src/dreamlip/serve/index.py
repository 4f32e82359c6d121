"""The image collection behind ``dreamlip serve``: its images and captions, their embeddings
(computed once and cached on disk), and top-k search over them.

A collection is read from a ``dreamlip demo-data`` directory (one split), records in any training
layout (our JSONL, the authors' CSVs, parquet, webdataset shards: docs/data.md), any retrieval
dataset ``dreamlip eval`` reads (Karpathy JSON, ``{image, caption}`` JSON/JSONL), or a plain
folder of images (searched recursively, no captions). Item ids are positions in that list.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dreamlip.eval.datasets import (
    RECORD_KINDS,
    EvalDataError,
    ImageSource,
    demo_split,
    holds_records,
    read_classes,
    read_records,
    read_retrieval,
)
from dreamlip.formats import DEMO_CLASSES, IMAGE_EXTENSIONS, TarMember, detect_source, list_images
from dreamlip.io import atomic_write

__all__ = [
    "Collection",
    "ExactIndex",
    "FaissIndex",
    "Item",
    "build_index",
    "cached_embeddings",
    "faiss_available",
    "read_collection",
]

CACHE_VERSION = 1
CHUNK_BYTES = 64 << 20  # rows of the embedding matrix scored at once by the exact index


@dataclass
class Item:
    image: ImageSource  # a local path, or an image inside a shard
    key: str  # the record's id, else the image's path within the collection
    raw: str | None = None  # the record's raw caption (alt-text)
    captioners: dict[str, dict[str, str | None]] = field(default_factory=dict)  # {name: {short, long}}
    texts: list[str] = field(default_factory=list)  # other captions (human or retrieval ones)


@dataclass
class Collection:
    items: list[Item]
    source: str
    classes: list[str] = field(default_factory=list)  # segmentation class names, if the dataset has them

    def __len__(self) -> int:
        return len(self.items)


def read_collection(spec: str | os.PathLike, split: str = "test") -> Collection:
    """The images (and captions, when the dataset has them) named by ``spec``."""
    path, kind = Path(spec), detect_source(spec)
    if kind in RECORD_KINDS:
        return _from_records(spec)
    if kind == "missing":
        raise EvalDataError(f"{path}: no such directory or file")
    if kind == "demo":
        collection = _from_records(demo_split(path, split))
        collection.classes = read_classes(str(path / DEMO_CLASSES), "segmentation").names
        return collection
    if kind == "folder":
        files = list_images(path)
        if not files:
            raise EvalDataError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return Collection([Item(str(f), str(f.relative_to(path))) for f in files], str(path))
    if kind == "jsonl" and holds_records(path):
        return _from_records(path)
    data = read_retrieval(path, split=split)
    items = [Item(str(image), Path(str(image)).name, texts=texts) for image, texts in zip(data.images, data.texts)]
    return Collection(items, data.source)


def _from_records(source: str | os.PathLike) -> Collection:
    images, records = read_records(source)
    items = []
    for image, record in zip(images, records):
        texts = record.extras.get("texts") or []
        if isinstance(texts, dict):  # {"source": [texts]}
            texts = [t for group in texts.values() for t in group]
        items.append(Item(image, record.key, record.raw_caption, record.captions, list(texts)))
    return Collection(items, str(source))


# ---------------------------------------------------------------------------------------------
# Embedding cache


def _digest_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def cache_key(checkpoint: str | os.PathLike, collection: Collection, image_size: Any) -> str:
    """Changes with the checkpoint's content, the image list (paths, sizes, mtimes) or the input size."""
    checkpoint = Path(checkpoint)
    weights = sorted(p for p in checkpoint.iterdir() if p.is_file()) if checkpoint.is_dir() else [checkpoint]
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size} {_digest_files(weights)}".encode())
    for item in collection.items:
        file = item.image.path if isinstance(item.image, TarMember) else item.image
        try:
            stat = os.stat(file)
        except OSError as err:
            raise EvalDataError(f"{file}: {err.strerror or err}") from None
        digest.update(f"\n{item.image}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def cached_embeddings(checkpoint: str | os.PathLike, collection: Collection, key: str, embed) -> np.ndarray:
    """The collection's embeddings ``[N, D]`` (float32, memory-mapped from the cache file).

    The cache lives beside the checkpoint, in ``<checkpoint>.serve-cache/<key>.npy``; ``embed()``
    computes the matrix when no file for ``key`` exists. Written atomically, so an interrupted
    run leaves no half file. A checkpoint in a read-only place is served without a cache.
    """
    cache = Path(f"{checkpoint}.serve-cache") / f"{key}.npy"
    if cache.is_file():
        embeddings = np.load(cache, mmap_mode="r")
        if embeddings.ndim == 2 and len(embeddings) == len(collection):
            return embeddings
    embeddings = np.ascontiguousarray(embed(), dtype=np.float32)
    try:
        atomic_write(cache, lambda handle: np.save(handle, embeddings), binary=True)
    except OSError as err:
        print(f"dreamlip serve: warning: embeddings not cached ({cache.parent}: {err})", file=sys.stderr)
        return embeddings
    return np.load(cache, mmap_mode="r")


# ---------------------------------------------------------------------------------------------
# Search


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class ExactIndex:
    """Exact top-k by inner product, scoring the matrix a chunk of rows at a time: a
    memory-mapped matrix larger than memory is read from disk as it is scored."""

    kind = "exact"

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = embeddings
        self.chunk = max(1, CHUNK_BYTES // max(1, embeddings.shape[1] * embeddings.itemsize))

    def __len__(self) -> int:
        return len(self.embeddings)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``, each ``[Q, min(k, N)]``, best first."""
        queries = np.asarray(queries, dtype=np.float32)
        k = min(k, len(self))
        best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_ids = np.zeros((len(queries), 0), dtype=np.int64)
        for start in range(0, len(self), self.chunk):
            scores = queries @ np.asarray(self.embeddings[start : start + self.chunk]).T  # [Q, c]
            if scores.shape[1] > k:
                top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                scores = np.take_along_axis(scores, top, axis=1)
            else:
                top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
            best_scores = np.concatenate([best_scores, scores], axis=1)
            best_ids = np.concatenate([best_ids, top + start], axis=1)
            if best_scores.shape[1] > k:
                keep = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                best_scores = np.take_along_axis(best_scores, keep, axis=1)
                best_ids = np.take_along_axis(best_ids, keep, axis=1)
        order = np.argsort(-best_scores, axis=1, kind="stable")
        return np.take_along_axis(best_scores, order, axis=1), np.take_along_axis(best_ids, order, axis=1)


class FaissIndex:
    """FAISS's exact inner-product index (``IndexFlatIP``): the vectors are held in memory."""

    kind = "faiss"

    def __init__(self, embeddings: np.ndarray):
        import faiss

        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(np.ascontiguousarray(embeddings, dtype=np.float32))

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self)))
        return scores, ids.astype(np.int64)


def build_index(embeddings: np.ndarray, kind: str = "auto") -> ExactIndex | FaissIndex:
    """``"faiss"``, ``"exact"``, or ``"auto"`` (FAISS when it is installed)."""
    if kind not in ("auto", "faiss", "exact"):
        raise ValueError(f"index must be 'auto', 'faiss' or 'exact', got {kind!r}")
    if kind == "faiss" and not faiss_available():
        raise ValueError("--index faiss: faiss is not installed (pip install faiss-cpu)")
    if kind == "faiss" or (kind == "auto" and faiss_available()):
        return FaissIndex(embeddings)
    return ExactIndex(embeddings)
