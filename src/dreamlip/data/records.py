"""The record schema and its readers: JSONL (the project's format), CSV and parquet tables, and
the field mapping that reads the layouts the field publishes as they are (the authors' released
caption files, img2dataset's metadata, PixelProse, ...; docs/data.md, "Layouts read").

A record is one image with its texts::

    {"image": "images/000001.png", "raw_caption": "...",
     "captions": {"<captioner>": {"short": "...", "long": "..."}, ...},
     "id": ..., "label": ..., "mask": ..., "objects": [...], "texts": ...}   # optional

Two kinds of problem are told apart (docs/data.md, "Bad input"): a file whose structure is wrong
is refused when it is read, with a :class:`SchemaError` naming the file, line and field; a sample
whose content turns out unusable (an unreadable image, no usable text, non-UTF-8 text) is kept as
a record and skipped when loaded, as a :class:`~dreamlip.io.BadSample` with a reason that the loader counts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import sys
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import numpy as np

from dreamlip.captions import join_sentences
from dreamlip.formats import BadLine, expand_shards, jsonl_objects

__all__ = [
    "ConcatTable",
    "ImageResolver",
    "Record",
    "RecordTable",
    "SchemaError",
    "key_index",
    "normalize_fields",
    "plan_fields",
    "read_csv",
    "read_jsonl",
    "read_parquet",
]

# An image and some text are required: a raw caption, or captions (long-caption-only releases).
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
# Where the published layouts keep each part of a record (docs/data.md, "Layouts read"), matched
# without regard to case; the first one present is read and the others stay metadata.
IMAGE_FIELDS = ("image", "image path")  # "Image Path": DreamLIP's released CSVs, a URL
URL_FIELD = "url"  # img2dataset's and PixelProse's: the image itself when a table names no other
RAW_CAPTION_FIELDS = (
    "raw_caption",
    "caption",  # img2dataset's --caption_col
    "text",  # LAION's TEXT, Hugging Face datasets
    "original_caption",  # PixelProse
    "org_caption",  # Recap-DataComp-1B
    "alt_text",
)
# Generated captions under names of their own: (captioner, length) they are read as.
NAMED_CAPTIONS = {"vlm_caption": ("vlm", "long"), "re_caption": ("recap", "long")}  # PixelProse, Recap-DataComp-1B
# The authors' CSVs name generated captions "short<CAPTIONER>_captions" / "long<CAPTIONER>_captions"
# (IB = InstructBLIP, SV = ShareGPT4V, LLA = LLaVA-1.5); any captioner name is accepted, in CSV
# columns, JSON fields and shard metadata alike.
_CAPTION_COLUMN = re.compile(r"^(short|long)([A-Za-z0-9]\w*?)_captions?$")
_CAPTION_LIKE = re.compile(r"caption|text|desc", re.IGNORECASE)
_KNOWN_NAMES = tuple(dict.fromkeys((*REQUIRED_FIELDS, *OPTIONAL_FIELDS, *IMAGE_FIELDS, *RAW_CAPTION_FIELDS, *NAMED_CAPTIONS)))
_SHORT_WORD = 6  # below this length, one replaced letter makes another word as often as a typo
STATUS_OK = "success"  # img2dataset's status of a downloaded image (PixelProse's of a captioned one)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
# str.encode can't write these: they stand for undecodable bytes (surrogateescape) or came from
# lone "\udcxx" escapes in JSON. Either way the text is not valid Unicode.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
Text = str | list[str] | None  # a caption, whole or split into sentences already


class SchemaError(ValueError):
    """A data file's structure is wrong; raised when the file is read, before training starts."""

    def __init__(self, source: str | Path, line: int | None, field: str | None, problem: str):
        self.source, self.line, self.field, self.problem = str(source), line, field, problem
        where = self.source if line is None else f"{self.source}:{line}"
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")


@dataclass(frozen=True)
class Record:
    """One image and its texts, as every reader hands it on.

    ``key`` identifies the sample: its ``id`` if it has one, else its ordinal in its file. The
    key, not the position in a loader, seeds the sub-caption draw (:func:`key_index`), so the same
    content read from JSONL, CSV or shards draws the same texts. A caption text is a string or
    the list of its sentences (split already).
    """

    key: str
    image: str | bytes | None  # a local path, encoded bytes (from a shard) or None (names none)
    raw_caption: str | None
    captions: dict[str, dict[str, Text]]
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


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions, transpositions."""
    previous2, previous = None, list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i] + [0] * len(b)
        for j, char_b in enumerate(b, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            if previous2 is not None and i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[-1]


def misspelt(name: str) -> str | None:
    """The schema field ``name`` is a typo of, if it is one: one edit away (two for names of ten
    characters or more), same first letter. Other names are metadata ("url", "width", "image_id",
    "status", "task"...), and so is a short name one letter replaced away from a field: short
    words that close are often words of their own ("test" is not "text", "mark" not "mask")."""
    lower = name.lower()
    if len(lower) < 4 or lower in _KNOWN_NAMES:
        return None
    allowed = 2 if len(lower) >= 10 else 1

    def typo(known: str) -> bool:
        # Typing slips rarely hit the first letter; requiring it keeps "task" (not "mask") metadata.
        if known[0] != lower[0] or _edit_distance(lower, known) > allowed:
            return False
        replaced = len(known) == len(lower) and sum(a != b for a, b in zip(known, lower)) == 1
        return not (replaced and len(lower) < _SHORT_WORD)

    typo_of = next((k for k in _KNOWN_NAMES if typo(k)), None)
    return "Image Path" if typo_of == "image path" else typo_of


@dataclass(frozen=True)
class FieldPlan:
    """Which field of a layout is read as what; worked out once per set of field names."""

    image: str | None  # the field naming the image (path or URL); None: the image is a shard member
    raw: str | None  # the field read as the raw caption
    captions: tuple[tuple[str, str, str], ...]  # (field, captioner, length) of flat caption fields
    extras: tuple[str, ...]  # everything else that is not a schema field: kept as metadata
    unread: tuple[str, ...]  # fields that look like captions but that nothing reads


@lru_cache(maxsize=1024)
def _plan(names: tuple[str, ...], image_field: bool, raw_fallback: bool) -> FieldPlan | tuple[str, str]:
    """The plan for ``names``, or the (field, problem) that makes them no record."""
    by_lower: dict[str, str] = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)

    def first(candidates) -> str | None:
        return next((by_lower[c] for c in candidates if c in by_lower), None)

    image = first(IMAGE_FIELDS)
    if image is None and image_field:
        image = by_lower.get(URL_FIELD)
    raw = first(RAW_CAPTION_FIELDS)
    captions, extras, unread = [], [], []
    for name in names:
        match = _CAPTION_COLUMN.match(name)
        named = NAMED_CAPTIONS.get(name.lower())
        if match:
            captions.append((name, match.group(2), match.group(1)))
        elif named:
            captions.append((name, *named))
        elif name in (image, raw) or name in OPTIONAL_FIELDS:
            continue
        else:
            typo = misspelt(name)
            if typo is not None:
                return name, f"unknown field; did you mean {typo!r}?"
            extras.append(name)
            if _CAPTION_LIKE.search(name):
                unread.append(name)
    if image is None and image_field:
        return "image", "missing (also looked for 'Image Path' and 'url')"
    if raw is None and not raw_fallback and not captions and "captions" not in names:
        return "raw_caption", (
            "missing: no caption field (raw_caption, caption, text, original_caption, captions, "
            "short<NAME>_captions / long<NAME>_captions, ...)"
        )
    return FieldPlan(image, raw, tuple(captions), tuple(extras), tuple(unread))


def plan_fields(
    names: Sequence[str], *, source, line, image_field: bool = True, raw_fallback: bool = False
) -> FieldPlan:
    """Map a layout's field names onto the record schema (docs/data.md, "Layouts read").

    ``image_field=False`` is for shard samples, whose image is a tar member, not a field;
    ``raw_fallback``: the raw caption may come from elsewhere (a shard's ``.txt`` member).
    Raises :class:`SchemaError` when no field holds the image or a caption, or a name is a typo.
    """
    plan = _plan(tuple(names), image_field, raw_fallback)
    if not isinstance(plan, FieldPlan):
        raise SchemaError(source, line, *plan)
    return plan


def _text(value: Any, source, line, name) -> Text:
    """A caption value: a string, a list of sentences (as pre-split layouts store it) or missing."""
    if value is None or (isinstance(value, float) and value != value):  # NaN: pandas' missing cell
        return None
    if isinstance(value, list) and all(isinstance(piece, str) for piece in value):
        return value or None
    _check_type(value, (str,), source, line, name)
    return value or None


def normalize_fields(
    obj: Any,
    *,
    source: str | Path,
    line: int | None,
    image_required: bool = True,
    plan: FieldPlan | None = None,
    fallback_raw: str | None = None,
) -> dict[str, Any]:
    """Validate one record's fields and return them normalised; raises :class:`SchemaError`.

    Fields beyond the schema are kept in ``extras`` unless they look like a misspelling.
    Returns ``{"image", "raw_caption", "captions", "id", "extras", "error", "unread"}`` where
    ``error`` is a skip reason known now: ``"text_encoding"`` when some text is not valid
    Unicode, ``"download_failed"`` when the record's ``status`` is not ``success``.
    ``image_required=False`` is for shard samples, whose image is a tar member, not a field;
    ``fallback_raw`` (a shard's ``.txt``) is the raw caption when no field holds one.
    """
    if not isinstance(obj, dict):
        raise SchemaError(source, line, None, f"expected a JSON object, got {type(obj).__name__}")
    if plan is None:
        plan = plan_fields(
            list(obj), source=source, line=line, image_field=image_required, raw_fallback=fallback_raw is not None
        )
    image = obj.get(plan.image) if plan.image else None
    if image is not None:
        _check_type(image, (str,), source, line, plan.image)
    raw = _text(obj[plan.raw], source, line, plan.raw) if plan.raw in obj else fallback_raw
    if isinstance(raw, list):
        raw = join_sentences(raw)
    captions_in = obj.get("captions")
    if captions_in is None:
        captions_in = {}
    _check_type(captions_in, (dict,), source, line, "captions")
    captions: dict[str, dict[str, Text]] = {}
    for captioner, by_length in captions_in.items():
        name = f"captions.{captioner}"
        _check_type(by_length, (dict,), source, line, name)
        for length in by_length:
            if length not in CAPTION_LENGTHS:
                raise SchemaError(source, line, f"{name}.{length}", "expected 'short' or 'long'")
        captions[captioner] = {
            length: _text(by_length.get(length), source, line, f"{name}.{length}") for length in CAPTION_LENGTHS
        }
    for name, captioner, length in plan.captions:
        by_length = captions.setdefault(captioner, dict.fromkeys(CAPTION_LENGTHS))
        value = _text(obj.get(name), source, line, name)
        if value is not None and by_length[length] is not None:
            raise SchemaError(source, line, name, f"gives captions.{captioner}.{length} a second time")
        by_length[length] = value if value is not None else by_length[length]
    record_id = obj.get("id")
    if record_id is not None:
        _check_type(record_id, (str, int), source, line, "id")
        record_id = str(record_id)
    extras = {}
    for name, types in _EXTRA_TYPES.items():
        if obj.get(name) is not None:
            _check_type(obj[name], types, source, line, name)
            extras[name] = obj[name]
    extras.update((name, obj[name]) for name in plan.extras if name in obj)
    texts = [raw] + [t for by_length in captions.values() for t in by_length.values()]
    pieces = [piece for t in texts if t is not None for piece in ([t] if isinstance(t, str) else t)]
    status = extras.get("status")
    error = None
    if any(_SURROGATE.search(piece) for piece in pieces):
        error = "text_encoding"
    elif isinstance(status, str) and status != STATUS_OK:
        error = "download_failed"
    return {
        "image": image or None,
        "raw_caption": raw,
        "captions": captions,
        "id": record_id,
        "extras": extras,
        "error": error,
        "unread": plan.unread,
        "image_field": plan.image,
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

    def __call__(self, value: str | None, *, source, line, field: str = "image") -> str | None:
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
            field,
            "is a URL; say how URLs map to local files: urlmap=DIR (img2dataset's output folder), "
            "urlmap=FILE or naming=basename|sha1|md5 (docs/data.md), or join the file to downloaded "
            "shards with `dreamlip prepare`",
        )


def read_url_map(path: str | Path, ext: str = "jpg") -> dict[str, str]:
    """A URL -> local path table (docs/data.md): a file of ``URL<TAB>PATH`` lines, or the output
    folder of ``img2dataset --output_format files``, whose ``<shard>.parquet`` logs say which URL
    became ``<shard>/<key>.<ext>`` (failed downloads are left out: their images count as missing)."""
    path = Path(path)
    if path.is_dir():
        return _img2dataset_files(path, ext)
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


def _img2dataset_files(folder: Path, ext: str) -> dict[str, str]:
    logs = sorted(folder.glob("*.parquet"))
    if not logs:
        raise SchemaError(folder, None, None, "holds no img2dataset <shard>.parquet logs to map URLs with")
    if any(log.with_suffix(".tar").is_file() for log in logs):
        raise SchemaError(
            folder, None, None, "holds webdataset tars, not image files: train on them (wds:...) or join "
            "the captions with `dreamlip prepare`"
        )
    table: dict[str, str] = {}
    for log in logs:
        for row in iter_parquet_rows(log, columns=["url", "key", "status"]):
            if row["status"] == STATUS_OK:
                table[row["url"]] = f"{log.stem}/{row['key']}.{ext}"
    return table


def parquet_module():
    """pyarrow.parquet, or a one-line error naming the extra that installs it."""
    try:
        import pyarrow.parquet
    except ModuleNotFoundError:
        raise ModuleNotFoundError("reading parquet needs pyarrow: pip install 'dreamlip[parquet]'") from None
    return pyarrow.parquet


def iter_parquet_rows(path: str | Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """The rows of a parquet file as dicts, a batch of rows in memory at a time."""
    try:
        table = parquet_module().ParquetFile(path)
        batches = table.iter_batches(batch_size=4096, columns=list(columns) if columns else None)
        for batch in batches:
            yield from batch.to_pylist()
    except (OSError, ValueError, KeyError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise SchemaError(path, None, None, f"not a readable parquet file ({err})") from None


class RecordTable:
    """Records stored as one JSON blob plus offsets.

    A list of millions of Python objects would be copied page by page into every dataloader worker
    as reference counts change (copy-on-read); one bytes object and a numpy array are not.
    ``unread``: the source's fields that look like captions but that nothing reads.
    """

    def __init__(
        self,
        source: str,
        records: Sequence[dict[str, Any]] | Iterator[dict[str, Any]],
        unread: Sequence[str] = (),
    ):
        self.source = source
        blob = bytearray()
        offsets = [0]
        for record in records:
            blob += json.dumps(record, ensure_ascii=True).encode("ascii")
            offsets.append(len(blob))
        self._blob = bytes(blob)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.unread = tuple(unread)

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
        "image": resolve(fields["image"], source=source, line=line, field=fields["image_field"]),
        "raw_caption": fields["raw_caption"],
        "captions": fields["captions"],
        "extras": extras,
        "error": fields["error"],
    }


def _resolver(path: Path, images: str | Path | None, naming: str, url_map: str | Path | None, ext: str):
    if images is None and url_map is not None and Path(url_map).is_dir():
        images = url_map  # img2dataset's folder: the paths it maps to are inside it
    root = Path(images) if images is not None else path.parent
    return ImageResolver(
        root=root.resolve(),
        naming=naming,  # type: ignore[arg-type]
        url_map=read_url_map(url_map, ext) if url_map is not None else None,
        ext=ext,
    )


def _table(
    source: str | Path,
    rows: Iterator[tuple[str | Path, int, Any, FieldPlan | None]],
    resolve: ImageResolver,
) -> RecordTable:
    """Validate ``(file, line, fields, plan)`` rows into a table (a plan of None: worked out per
    row); errors name the file and line."""
    unread: dict[str, None] = {}

    def records() -> Iterator[dict[str, Any]]:
        for ordinal, (where, line, obj, plan) in enumerate(rows):
            fields = normalize_fields(obj, source=where, line=line, plan=plan)
            unread.update(dict.fromkeys(fields["unread"]))
            yield _record(fields, ordinal, resolve, where, line)

    table = RecordTable(str(source), records())
    table.unread = tuple(unread)
    return table


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

    def rows() -> Iterator[tuple[Path, int, Any, None]]:
        # A line with undecodable bytes still parses (as surrogates): the record is marked
        # "text_encoding" (skipped when loaded) instead of refusing the whole file.
        try:
            for line_number, obj in jsonl_objects(path):
                yield path, line_number, obj, None
        except BadLine as err:
            raise SchemaError(path, err.line, None, err.problem) from None

    return _table(path, rows(), _resolver(path, images, naming, url_map, ext))


# The row index pandas writes by default: not data.
_INDEX_COLUMNS = ("", "Unnamed: 0", "__index_level_0__")


def _columns(header: Sequence[str], source: str | Path, line: int | None) -> tuple[list[str], FieldPlan]:
    """A table's data columns and their plan; a repeated column is refused."""
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise SchemaError(source, line, name, "column appears twice")
        seen.add(name)
    names = [name for name in header if name not in _INDEX_COLUMNS]
    return names, plan_fields(names, source=source, line=line)


def read_csv(
    path: str | Path,
    *,
    images: str | Path | None = None,
    naming: str = "path",
    url_map: str | Path | None = None,
    ext: str = "jpg",
) -> RecordTable:
    """Read an annotation CSV (``.tsv``: tab-separated) such as the authors' released ones; columns
    map as in docs/data.md. Empty cells are missing values. Raises :class:`SchemaError` for a wrong
    header or a row whose field count differs from the header's.
    """
    path = Path(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # Long captions can exceed the csv module's default 128 KiB field limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

    def rows() -> Iterator[tuple[Path, int, dict[str, Any], FieldPlan]]:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as stream:
            reader = csv.reader(stream, delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                raise SchemaError(path, 1, None, "empty file, expected a header row") from None
            names, plan = _columns(header, path, 1)
            columns = [header.index(name) for name in names]
            while True:
                start = reader.line_num + 1  # errors name the line a record starts on
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as err:
                    raise SchemaError(path, reader.line_num, None, f"malformed CSV: {err}") from None
                if not row:
                    continue
                if len(row) != len(header):
                    raise SchemaError(path, start, None, f"row has {len(row)} fields, header has {len(header)}")
                yield path, start, {name: row[c] or None for name, c in zip(names, columns)}, plan

    return _table(path, rows(), _resolver(path, images, naming, url_map, ext))


def read_parquet(
    path: str | Path,
    *,
    images: str | Path | None = None,
    naming: str = "path",
    url_map: str | Path | None = None,
    ext: str = "jpg",
) -> RecordTable:
    """Read parquet files (a path or a brace pattern of several, read in order) with the same
    column mapping as :func:`read_csv`: the authors' CSVs converted (FLAIR's route), PixelProse,
    img2dataset's logs. Errors name the file and the row (counted from 1)."""
    paths = [Path(p) for p in expand_shards(str(path))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"parquet source {missing[0]!r} not found")

    def rows() -> Iterator[tuple[Path, int, dict[str, Any], FieldPlan]]:
        for file in paths:
            try:
                header = parquet_module().read_schema(file).names
            except (OSError, ValueError) as err:
                raise SchemaError(file, None, None, f"not a readable parquet file ({err})") from None
            names, plan = _columns(header, file, None)
            for number, row in enumerate(iter_parquet_rows(file, columns=names), 1):
                yield file, number, row, plan

    return _table(path, rows(), _resolver(paths[0], images, naming, url_map, ext))
