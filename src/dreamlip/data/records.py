"""The record schema and its readers: JSONL (the project's format) and the authors' released CSVs.

A record is one image with its texts::

    {"image": "images/000001.png", "raw_caption": "...",
     "captions": {"<captioner>": {"short": "...", "long": "..."}, ...},
     "id": ..., "label": ..., "mask": ..., "objects": [...], "texts": ...}   # optional

Two kinds of problem are told apart (docs/data.md, "Bad input"): a file whose structure is wrong
is refused when it is read, with a :class:`SchemaError` naming the file, line and field; a sample
whose content turns out unusable (an unreadable image, no usable text, non-UTF-8 text) is kept as
a record and skipped when loaded, as a :class:`BadSample` with a reason that the loader counts.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import re
import sys
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

__all__ = [
    "BadSample",
    "ConcatTable",
    "ImageResolver",
    "Record",
    "RecordTable",
    "SchemaError",
    "key_index",
    "normalize_fields",
    "read_csv",
    "read_jsonl",
]

REQUIRED_FIELDS = ("image", "raw_caption")
OPTIONAL_FIELDS = ("captions", "id", "label", "mask", "objects", "texts")
CAPTION_LENGTHS = ("short", "long")
# JSON types accepted for the optional fields the trainer passes through untouched.
_EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "label": (int, str, list),
    "mask": (str,),
    "objects": (list,),
    "texts": (list, dict),
}
# The authors' CSVs name generated captions "short<CAPTIONER>_captions" / "long<CAPTIONER>_captions"
# (IB = InstructBLIP, SV = ShareGPT4V, LLA = LLaVA-1.5); any captioner name is accepted.
_CAPTION_COLUMN = re.compile(r"^(short|long)(\w+?)_captions?$")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# str.encode can't write these: they stand for undecodable bytes (surrogateescape) or came from
# lone "\udcxx" escapes in JSON. Either way the text is not valid Unicode.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


class SchemaError(ValueError):
    """A data file's structure is wrong; raised when the file is read, before training starts."""

    def __init__(self, source: str | Path, line: int | None, field: str | None, problem: str):
        self.source, self.line, self.field, self.problem = str(source), line, field, problem
        where = self.source if line is None else f"{self.source}:{line}"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")


class BadSample(Exception):
    """One sample can't be used; ``reason`` is the key it is counted under (docs/data.md)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Record:
    """One image and its texts, as every reader hands it on.

    ``key`` identifies the sample: its ``id`` if it has one, else its ordinal in its file. The
    key, not the position in a loader, seeds the sub-caption draw (:func:`key_index`), so the same
    content read from JSONL, CSV or shards draws the same texts.
    """

    key: str
    image: str | bytes | None  # a local path, encoded bytes (from a shard) or None (names none)
    raw_caption: str | None
    captions: dict[str, dict[str, str | None]]
    extras: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # a skip reason already known when reading (e.g. "text_encoding")


def key_index(key: str) -> int:
    """A stable non-negative 63-bit integer for a sample key (the SubcaptionSampler's index)."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _check_type(value: Any, types: tuple[type, ...], source, line, name) -> None:
    # bool is an int subclass in Python, but a JSON true is never a valid label or id.
    if isinstance(value, bool) or not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in types)
        raise SchemaError(source, line, name, f"expected {expected}, got {type(value).__name__}")


def check_unknown_name(name: str, source: str | Path, line: int | None, what: str) -> None:
    """Other fields and columns pass through (datasets carry metadata: "background", "url",
    "width"...), but one that looks like a misspelt known field would silently lose data."""
    # "id" is left out of the fuzzy match: too short, it would match "uid", "ids", ...
    known = [f for f in REQUIRED_FIELDS + OPTIONAL_FIELDS if f != "id"]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        raise SchemaError(source, line, name, f"unknown {what}; did you mean {close[0]!r}?")
    if "caption" in name.lower():
        raise SchemaError(
            source,
            line,
            name,
            f"unknown caption {what}; captions go in 'raw_caption' or 'captions' "
            "(CSV: short<CAPTIONER>_captions / long<CAPTIONER>_captions)",
        )


def normalize_fields(
    obj: Any, *, source: str | Path, line: int | None, image_required: bool = True
) -> dict[str, Any]:
    """Validate one record's fields and return them normalised; raises :class:`SchemaError`.

    Fields beyond the schema are kept in ``extras`` unless they look like a misspelling.
    Returns ``{"image", "raw_caption", "captions", "id", "extras", "error"}`` where ``error`` is
    ``"text_encoding"`` when some text is not valid Unicode (a bad sample, not a bad file).
    ``image_required=False`` is for shard samples, whose image is a tar member, not a field.
    """
    if not isinstance(obj, dict):
        raise SchemaError(source, line, None, f"expected a JSON object, got {type(obj).__name__}")
    unknown = [name for name in obj if name not in REQUIRED_FIELDS + OPTIONAL_FIELDS]
    for name in unknown:
        check_unknown_name(name, source, line, "field")
    for name in REQUIRED_FIELDS:
        if name not in obj and (image_required or name != "image"):
            raise SchemaError(source, line, name, "missing")
    image = obj.get("image")
    if image is not None:
        _check_type(image, (str,), source, line, "image")
    raw = obj["raw_caption"]
    if raw is not None:
        _check_type(raw, (str,), source, line, "raw_caption")
    captions_in = obj.get("captions")
    if captions_in is None:
        captions_in = {}
    _check_type(captions_in, (dict,), source, line, "captions")
    captions: dict[str, dict[str, str | None]] = {}
    for captioner, by_length in captions_in.items():
        name = f"captions.{captioner}"
        _check_type(by_length, (dict,), source, line, name)
        for length, text in by_length.items():
            if length not in CAPTION_LENGTHS:
                raise SchemaError(source, line, f"{name}.{length}", "expected 'short' or 'long'")
            if text is not None:
                _check_type(text, (str,), source, line, f"{name}.{length}")
        captions[captioner] = {length: by_length.get(length) for length in CAPTION_LENGTHS}
    record_id = obj.get("id")
    if record_id is not None:
        _check_type(record_id, (str, int), source, line, "id")
        record_id = str(record_id)
    extras = {}
    for name, types in _EXTRA_TYPES.items():
        if obj.get(name) is not None:
            _check_type(obj[name], types, source, line, name)
            extras[name] = obj[name]
    extras.update((name, obj[name]) for name in unknown)
    texts = [raw] + [t for by_length in captions.values() for t in by_length.values()]
    bad_text = any(t is not None and _SURROGATE.search(t) for t in texts)
    return {
        "image": image or None,
        "raw_caption": raw,
        "captions": captions,
        "id": record_id,
        "extras": extras,
        "error": "text_encoding" if bad_text else None,
    }


@dataclass(frozen=True)
class ImageResolver:
    """Turns a record's ``image`` value into a local path.

    A relative path is taken relative to ``root``. A URL (the authors' CSVs key images by their
    web address) is looked up in ``url_map`` when one is given, else named by ``naming``:
    ``"basename"`` -> ``root/<last path component of the URL>``, ``"sha1"``/``"md5"`` ->
    ``root/<hex digest of the URL>.<ext>``. Existence is checked when the sample loads, not here.
    """

    root: Path
    naming: Literal["path", "basename", "sha1", "md5"] = "path"
    url_map: Mapping[str, str] | None = None
    ext: str = "jpg"

    def __call__(self, value: str | None, *, source, line) -> str | None:
        if not value:
            return None
        if not _URL.match(value):
            return str(self.root / value)
        if self.url_map is not None:
            path = self.url_map.get(value)
            return None if path is None else str(self.root / path)
        if self.naming == "basename":
            return str(self.root / Path(urlparse(value).path).name)
        if self.naming in ("sha1", "md5"):
            digest = hashlib.new(self.naming, value.encode("utf-8", "surrogateescape")).hexdigest()
            return str(self.root / f"{digest}.{self.ext}")
        raise SchemaError(
            source,
            line,
            "image",
            "is a URL; say how URLs map to local files with urlmap=FILE or naming=basename|sha1|md5",
        )


def read_url_map(path: str | Path) -> dict[str, str]:
    """A URL -> local path table: one ``URL<TAB>PATH`` per line (docs/data.md)."""
    table: dict[str, str] = {}
    with open(path, encoding="utf-8") as stream:
        for line_number, line in enumerate(stream, 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise SchemaError(path, line_number, None, "expected 'URL<TAB>PATH'")
            table[parts[0]] = parts[1]
    return table


class RecordTable:
    """Records stored as one JSON blob plus offsets.

    A list of millions of Python objects would be copied page by page into every dataloader worker
    as reference counts change (copy-on-read); one bytes object and a numpy array are not.
    """

    def __init__(self, source: str, records: Sequence[dict[str, Any]] | Iterator[dict[str, Any]]):
        self.source = source
        blob = bytearray()
        offsets = [0]
        for record in records:
            blob += json.dumps(record, ensure_ascii=True).encode("ascii")
            offsets.append(len(blob))
        self._blob = bytes(blob)
        self._offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records in {self.source}")
        start, stop = self._offsets[index], self._offsets[index + 1]
        return Record(**json.loads(self._blob[start:stop]))


class ConcatTable:
    """Several tables addressed by one global index (the loader's view of mixed sources)."""

    def __init__(self, tables: Sequence[RecordTable]):
        self.tables = list(tables)
        self.offsets = np.cumsum([0] + [len(t) for t in self.tables]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> Record:
        which = bisect_right(self.offsets, index) - 1
        return self.tables[which][index - self.offsets[which]]


def _record(fields: dict[str, Any], ordinal: int, resolve: ImageResolver, source, line) -> dict:
    extras = fields["extras"]
    if "mask" in extras:
        extras["mask"] = str(resolve.root / extras["mask"])
    return {
        "key": fields["id"] if fields["id"] is not None else f"{ordinal:09d}",
        "image": resolve(fields["image"], source=source, line=line),
        "raw_caption": fields["raw_caption"],
        "captions": fields["captions"],
        "extras": extras,
        "error": fields["error"],
    }


def _resolver(path: Path, images: str | Path | None, naming: str, url_map: str | Path | None, ext: str):
    root = Path(images) if images is not None else path.parent
    return ImageResolver(
        root=root.resolve(),
        naming=naming,  # type: ignore[arg-type]
        url_map=read_url_map(url_map) if url_map is not None else None,
        ext=ext,
    )


def read_jsonl(
    path: str | Path,
    *,
    images: str | Path | None = None,
    naming: str = "path",
    url_map: str | Path | None = None,
    ext: str = "jpg",
) -> RecordTable:
    """Read and validate a JSONL file, one record per line; image paths are relative to
    ``images`` (default: the file's directory). Raises :class:`SchemaError` on the first bad line.
    """
    path = Path(path)
    resolve = _resolver(path, images, naming, url_map, ext)

    def records() -> Iterator[dict[str, Any]]:
        ordinal = 0
        with open(path, "rb") as stream:
            for line_number, raw_line in enumerate(stream, 1):
                if line_number == 1 and raw_line.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
                    raw_line = raw_line[3:]
                if not raw_line.strip():
                    continue
                # Undecodable bytes become surrogates: the line still parses, and the record is
                # marked "text_encoding" (skipped when loaded) instead of refusing the whole file.
                text = raw_line.decode("utf-8", "surrogateescape")
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as err:
                    raise SchemaError(
                        path, line_number, None, f"not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
                fields = normalize_fields(obj, source=path, line=line_number)
                yield _record(fields, ordinal, resolve, path, line_number)
                ordinal += 1

    return RecordTable(str(path), records())


def _csv_columns(header: list[str], path: Path) -> dict[int, tuple[str, ...]]:
    """Column index -> where its value goes: ("image",), ("captions", captioner, length), ..."""
    plan: dict[int, tuple[str, ...]] = {}
    seen: set[str] = set()
    for column, name in enumerate(header):
        if name in seen:
            raise SchemaError(path, 1, name, "column appears twice")
        seen.add(name)
        match = _CAPTION_COLUMN.match(name)
        if match:
            plan[column] = ("captions", match.group(2), match.group(1))
        elif name in ("", "Unnamed: 0"):  # the row index pandas writes by default: not data
            continue
        else:
            if name not in REQUIRED_FIELDS + OPTIONAL_FIELDS:
                check_unknown_name(name, path, 1, "column")
            plan[column] = (name,)
    for name in REQUIRED_FIELDS:
        if name not in seen:
            raise SchemaError(path, 1, name, f"missing column (header: {', '.join(header)})")
    return plan


def read_csv(
    path: str | Path,
    *,
    images: str | Path | None = None,
    naming: str = "path",
    url_map: str | Path | None = None,
    ext: str = "jpg",
) -> RecordTable:
    """Read the authors' annotation CSV (``.tsv``: tab-separated); columns map as in docs/data.md.

    Empty cells are missing values. Raises :class:`SchemaError` for a wrong header or a row whose
    field count differs from the header's.
    """
    path = Path(path)
    resolve = _resolver(path, images, naming, url_map, ext)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # Long captions can exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

    def records() -> Iterator[dict[str, Any]]:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as stream:
            reader = csv.reader(stream, delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                raise SchemaError(path, 1, None, "empty file, expected a header row") from None
            plan = _csv_columns(header, path)
            ordinal = 0
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    raise SchemaError(path, reader.line_num, None, f"malformed CSV: {err}") from None
                if not row:
                    continue
                if len(row) != len(header):
                    raise SchemaError(
                        path, reader.line_num, None, f"row has {len(row)} fields, header has {len(header)}"
                    )
                obj: dict[str, Any] = {"captions": {}}
                for column, target in plan.items():
                    value = row[column] or None
                    if target[0] == "captions":
                        obj["captions"].setdefault(target[1], {})[target[2]] = value
                    else:
                        obj[target[0]] = value
                fields = normalize_fields(obj, source=path, line=reader.line_num)
                yield _record(fields, ordinal, resolve, path, reader.line_num)
                ordinal += 1

    return RecordTable(str(path), records())
