"""The data SPEC string of ``dreamlip train``: which sources to read and how to mix them.

Grammar (docs/data.md, "SPEC")::

    SPEC   := SOURCE ("," SOURCE)*
    SOURCE := [KIND ":"] PATH ["?" KEY "=" VALUE ("&" KEY "=" VALUE)*] [":" WEIGHT]
    KIND   := jsonl | csv | parquet | wds      (default: from PATH's suffix)

e.g. ``train.jsonl``, ``csv:cc3m.csv?images=/data/cc3m&naming=sha1``,
``data/a.jsonl:0.7,wds:shards/{00000..00009}.tar?resample=1:0.3``. Commas inside ``{...}`` belong
to the brace pattern, not to the list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .records import RecordTable, SchemaError, read_csv, read_jsonl, read_parquet
from .shards import ShardSource

__all__ = ["SourceSpec", "SpecError", "open_source", "parse_spec"]

_OPTIONS = {
    "jsonl": ("images", "urlmap", "naming", "ext"),
    "csv": ("images", "urlmap", "naming", "ext"),
    "parquet": ("images", "urlmap", "naming", "ext"),
    "wds": ("samples", "resample"),
}
_NAMINGS = ("path", "basename", "sha1", "md5")
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
_WEIGHT = re.compile(r"^(.*):(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+)$")
_KIND = re.compile(r"^(jsonl|csv|parquet|wds):(.*)$")


class SpecError(ValueError):
    """The SPEC string can't be understood."""


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "jsonl", "csv", "parquet" or "wds"
    path: str
    weight: float | None = None
    options: dict[str, str] = field(default_factory=dict)


def _split_top_level(spec: str) -> list[str]:
    items, depth, current = [], 0, []
    for char in spec:
        depth += char == "{"
        depth -= char == "}"
        if char == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


def _infer_kind(path: str, item: str) -> str:
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return "jsonl"
    if lower.endswith((".csv", ".tsv")):
        return "csv"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".tar", ".tar.gz", ".tgz")) or "::" in path:
        return "wds"
    raise SpecError(f"can't tell what kind of source {item!r} is; prefix it with jsonl:, csv:, parquet: or wds:")


def _parse_source(item: str) -> SourceSpec:
    text = item.strip()
    if not text:
        raise SpecError("empty source in SPEC (two commas in a row, or a trailing comma?)")
    weight = None
    match = _WEIGHT.match(text)
    if match:
        text, weight = match.group(1), float(match.group(2))
        if weight <= 0:
            raise SpecError(f"weight of {item!r} must be > 0")
    match = _KIND.match(text)
    kind, text = (match.group(1), match.group(2)) if match else (None, text)
    path, _, query = text.partition("?")
    if not path:
        raise SpecError(f"source {item!r} has no path")
    kind = kind or _infer_kind(path, item)
    options: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, equals, value = pair.partition("=")
        if not equals or key not in _OPTIONS[kind]:
            raise SpecError(
                f"{item!r}: unknown option {pair!r}; {kind} sources take {', '.join(_OPTIONS[kind])}"
            )
        if key in options:
            raise SpecError(f"{item!r}: option {key!r} given twice")
        options[key] = value
    if options.get("naming", "path") not in _NAMINGS:
        raise SpecError(f"{item!r}: naming must be one of {', '.join(_NAMINGS)}")
    if "samples" in options and not (options["samples"].isdigit() and int(options["samples"]) > 0):
        raise SpecError(f"{item!r}: samples must be a positive integer")
    if options.get("resample", "0").lower() not in _BOOLEANS:
        raise SpecError(f"{item!r}: resample must be 0 or 1")
    return SourceSpec(kind=kind, path=path, weight=weight, options=options)


def parse_spec(spec: str) -> list[SourceSpec]:
    """Parse a SPEC string; weights must be given for every source or for none."""
    sources = [_parse_source(item) for item in _split_top_level(spec)]
    weighted = [s.weight is not None for s in sources]
    if any(weighted) and not all(weighted):
        raise SpecError(f"give a weight to every source or to none: {spec!r}")
    return sources


def open_source(source: SourceSpec) -> RecordTable | ShardSource:
    """Read (JSONL, CSV, parquet: validating every record now) or check (shards: the first
    sample) a source."""
    options = source.options
    if source.kind == "wds":
        samples = options.get("samples")
        return ShardSource.open(
            source.path,
            resample=_BOOLEANS[options.get("resample", "0").lower()],
            size=int(samples) if samples else None,
        )
    if source.kind != "parquet" and not Path(source.path).is_file():  # parquet: a pattern, checked when read
        raise FileNotFoundError(f"{source.kind} source {source.path!r} not found")
    read = {"jsonl": read_jsonl, "csv": read_csv, "parquet": read_parquet}[source.kind]
    table = read(
        source.path,
        images=options.get("images"),
        naming=options.get("naming", "path"),
        url_map=options.get("urlmap"),
        ext=options.get("ext", "jpg"),
    )
    if len(table) == 0:
        raise SchemaError(source.path, None, None, "holds no records")
    return table
