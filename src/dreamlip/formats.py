"""Dataset layouts on disk, known in one place: training (``data/``), evaluation, recaptioning,
serving and the demo writer all read and name them through this module, so the same folder,
JSONL file or tar gives the same images to every command.

- Which files are images (:data:`IMAGE_EXTENSIONS`, :func:`is_image_name`) and the one folder
  walk (:func:`walk_files`, :func:`list_images`): hidden files and directories (``.git``,
  ``.ipynb_checkpoints``, ``._x.jpg``) are skipped at every depth, links to directories are
  followed (each directory once), paths come sorted.
- Webdataset tars: members grouped into samples as webdataset groups them (:func:`wds_key_ext`;
  a sample is a run of consecutive members sharing a key), streamed with their bytes
  (:func:`stream_tar`, any compression) or indexed for seeking (:func:`index_tar`, uncompressed);
  shard lists from a brace pattern or a folder (:func:`expand_shards`, :func:`tar_paths`).
- JSONL: one line reader (:func:`jsonl_objects`, :func:`json_line`), for records and for the
  other JSON-per-line layouts; the record schema itself is ``dreamlip.data.records``.
- The directory ``dreamlip demo-data`` writes (:data:`DEMO_CLASSES`, :func:`demo_split_file`...).
- What a dataset argument names (:func:`detect_source`).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

__all__ = [
    "DEMO_CLASSES",
    "DEMO_IMAGES",
    "DEMO_MASKS",
    "DEMO_META",
    "DEMO_SPLITS",
    "IMAGE_EXTENSIONS",
    "BadLine",
    "TarMember",
    "demo_image_name",
    "demo_mask_name",
    "demo_split_file",
    "demo_splits",
    "detect_source",
    "expand_shards",
    "image_ext",
    "index_tar",
    "is_demo_dir",
    "is_image_name",
    "json_line",
    "jsonl_objects",
    "list_images",
    "stream_tar",
    "tar_paths",
    "walk_files",
    "wds_key_ext",
]

# Lower-case extensions read as images everywhere: image folders, shard members, class folders.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


# ---------------------------------------------------------------------------------------------
# Image files and folders


def _hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS` (any case); dot-files are not images."""
    stem, dot, ext = os.path.basename(name).rpartition(".")
    return bool(dot and stem) and not _hidden(stem) and ext.lower() in IMAGE_EXTENSIONS


def walk_files(root: str | Path, suffix: str | None = None) -> list[Path]:
    """Every file under ``root`` (with ``suffix``, any case, when given), sorted by path relative to
    ``root``; hidden files and everything under hidden directories are left out."""
    root = Path(root)
    return sorted(_walk(root, suffix), key=lambda p: p.relative_to(root).parts)


def _walk(root: Path, suffix: str | None) -> Iterator[Path]:
    seen = {os.path.realpath(root)}  # a link back up the tree is walked once, not forever
    for directory, subdirs, files in os.walk(root, followlinks=True):
        kept = []
        for name in subdirs:
            real = os.path.realpath(os.path.join(directory, name))
            if not _hidden(name) and real not in seen:
                seen.add(real)
                kept.append(name)
        subdirs[:] = kept
        for name in files:
            if not _hidden(name) and (suffix is None or name.lower().endswith(suffix)):
                yield Path(directory, name)


def list_images(root: str | Path) -> list[Path]:
    """The images of a folder, at any depth, by :func:`walk_files`'s rule."""
    return [path for path in walk_files(root) if is_image_name(path.name)]


def image_ext(extensions: Iterable[str]) -> str | None:
    """Which of a sample's member extensions holds its image (the first in :data:`IMAGE_EXTENSIONS`)."""
    present = set(extensions)
    return next((ext for ext in IMAGE_EXTENSIONS if ext in present), None)


# ---------------------------------------------------------------------------------------------
# Webdataset tars


def wds_key_ext(name: str) -> tuple[str, str]:
    """A tar member name as webdataset groups it: (key, lower-case extension).

    webdataset's own rule: the key is the directory plus the file name up to its first dot, the
    extension everything after it (``a/b.seg.png`` -> ``("a/b", "seg.png")``). A name without a
    dot belongs to no sample; it is returned as ``(name, "")``.
    """
    key, ext = base_plus_ext(name)
    return (name, "") if key is None else (key, ext.lower())


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern (``a/{00000..00009}.tar``; ``::`` joins several)."""
    return expand_urls(pattern)


def tar_paths(spec: str | Path) -> list[Path]:
    """The tars ``spec`` names: a folder's (at any depth, by :func:`walk_files`'s rule), or a file
    or brace pattern's, in order. Raises :class:`FileNotFoundError` naming a missing one."""
    path = Path(spec)
    if path.is_dir():
        tars = walk_files(path, ".tar")
        if not tars:
            raise FileNotFoundError(f"{spec}: no .tar shards in this folder")
        return tars
    tars = [Path(p) for p in expand_shards(str(spec))]
    missing = [str(p) for p in tars if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(tars)} shards of {str(spec)!r} not found, e.g. {missing[0]}")
    return tars


Item = TypeVar("Item")


# webdataset's own metadata members (``__index__``...), which belong to no sample.
_WDS_META = re.compile(r"__[^/]*__($|/)")


def _samples(members: Iterable[tuple[str, Item]]) -> Iterator[tuple[str, list[Item]]]:
    """``(member name, item)`` pairs grouped into webdataset samples: runs of one key. As
    webdataset does, members without a key (no dot in the name) or named ``__...__`` are left
    out, without ending the sample around them."""
    key, items = None, []
    for name, item in members:
        member_key, ext = wds_key_ext(name)
        if not ext or _WDS_META.match(name):
            continue
        if member_key != key and items:
            yield key, items
            items = []
        key = member_key
        items.append(item)
    if items:
        yield key, items


def stream_tar(path: str | Path) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A tar's samples in tar order, read as a stream (compressed tars too): ``(key, [(member
    name, bytes), ...])``. Tar errors propagate."""
    with tarfile.open(path, "r|*") as archive:
        files = (info for info in archive if info.isfile())
        yield from _samples((info.name, (info.name, archive.extractfile(info).read())) for info in files)


@dataclass(frozen=True)
class TarMember:
    """A file inside an uncompressed tar, read by seeking (no extraction, no full read)."""

    path: str
    offset: int
    size: int
    name: str

    def read(self) -> bytes:
        with open(self.path, "rb") as stream:
            stream.seek(self.offset)
            return stream.read(self.size)

    def __str__(self) -> str:
        return f"{self.path}:{self.name}"


def index_tar(path: str | Path) -> Iterator[tuple[str, dict[str, TarMember]]]:
    """An uncompressed tar's samples in tar order, as ``(key, {extension: member})`` without
    reading the members' bytes. A compressed tar (which cannot be seeked) raises
    :class:`tarfile.ReadError`; other tar errors propagate."""
    with tarfile.open(path, "r:") as archive:
        files = (
            (info.name, TarMember(str(path), info.offset_data, info.size, info.name)) for info in archive if info.isfile()
        )
        for key, members in _samples(files):
            by_ext: dict[str, TarMember] = {}
            for member in members:
                by_ext.setdefault(wds_key_ext(member.name)[1], member)
            yield key, by_ext


# ---------------------------------------------------------------------------------------------
# JSONL


class BadLine(ValueError):
    """A line of a JSONL file that is not JSON; the message names the file and line."""

    def __init__(self, path: str | Path, line: int, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}")


def json_line(raw: bytes) -> Any:
    """One JSONL line's value. Undecodable bytes become surrogates, so a line with a bad byte in a
    caption still parses (readers mark such a record rather than refuse the file). Raises
    :class:`ValueError` with the problem (``not valid JSON (... at column N)``)."""
    try:
        # Without its line ending, so that an error's column is on the line, not past it.
        return json.loads(raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at column {err.colno})") from None


def jsonl_objects(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line (a UTF-8 BOM at the start is allowed).
    Raises :class:`BadLine` at the first line that is not JSON."""
    with open(path, "rb") as stream:
        for number, raw in enumerate(stream, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                yield number, json_line(raw)
            except ValueError as err:
                raise BadLine(path, number, str(err)) from None


# ---------------------------------------------------------------------------------------------
# The demo directory: DIR/{train,test}.jsonl, classes.json, meta.json, images/<split>/, masks/<split>/

DEMO_SPLITS = ("train", "test")
DEMO_CLASSES = "classes.json"  # {"classification": ..., "segmentation": ...} (eval's class lists)
DEMO_META = "meta.json"  # what the directory was rendered from; a match lets it be reused
DEMO_IMAGES, DEMO_MASKS = "images", "masks"  # folders of one subfolder per split


def demo_split_file(root: str | Path, split: str) -> Path:
    return Path(root) / f"{split}.jsonl"


def demo_image_name(split: str, name: str) -> str:
    """A record's ``image``, relative to the directory."""
    return f"{DEMO_IMAGES}/{split}/{name}.png"


def demo_mask_name(split: str, name: str) -> str:
    """A record's ``mask``, relative to the directory."""
    return f"{DEMO_MASKS}/{split}/{name}.png"


def is_demo_dir(path: str | Path) -> bool:
    """A directory laid out as ``dreamlip demo-data`` writes (``classes.json`` + JSONL splits)."""
    path = Path(path)
    return path.is_dir() and (path / DEMO_CLASSES).is_file() and any(path.glob("*.jsonl"))


def demo_splits(root: str | Path) -> list[str]:
    return sorted(p.stem for p in Path(root).glob("*.jsonl"))


# ---------------------------------------------------------------------------------------------
# What a dataset argument names

_SPEC_KINDS = ("jsonl:", "csv:", "parquet:", "wds:")


def detect_source(data: str | Path) -> str:
    """What ``data`` names, from its form and what is on disk:

    - ``"demo"``: a ``dreamlip demo-data`` directory;
    - ``"spec"``: a training SPEC item with a kind prefix or options (``csv:a.csv?images=...``);
    - ``"table"``: a CSV, TSV or parquet file (or parquet pattern);
    - ``"shards"``: a ``.tar`` (or ``.tar.gz``), a brace pattern of tars, or a folder holding tars;
    - ``"jsonl"``, ``"json"``: a file with that suffix (``.ndjson`` is JSONL);
    - ``"folder"``: any other directory (a folder of images);
    - ``"file"``: any other file; ``"missing"``: nothing there.
    """
    text = str(data)
    path = Path(text)
    suffix = path.suffix.lower()
    if text.startswith(_SPEC_KINDS) or "?" in text:
        return "spec"
    if is_demo_dir(path):
        return "demo"
    if suffix in (".csv", ".tsv", ".parquet"):
        return "table"
    if text.lower().endswith((".tar", ".tar.gz", ".tgz")) or ("{" in text and ".tar" in text):
        return "shards"
    if path.is_dir():
        return "shards" if next(_walk(path, ".tar"), None) else "folder"
    if not path.exists():
        return "missing"
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}.get(suffix, "file")
