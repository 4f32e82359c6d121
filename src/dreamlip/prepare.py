"""``dreamlip prepare``: a caption file and img2dataset's downloaded images in, training shards out
(docs/prepare.md).

1. **Join** (with ``--captions``, one pass over the caption file): img2dataset's ``<shard>.parquet``
   logs say which URL went to which of its shards and whether it downloaded; every caption row is
   routed to its shard's bucket (``work/rows/<shard>.jsonl``) or counted as missing (no log row)
   or failed (by status). The logs are held as sorted 64-bit URL hashes, not a dict of URLs.
2. **Units**, one per img2dataset tar, in ``--workers`` processes: each sample is matched to its
   caption row by URL, validated with the record readers' field mapping, its long captions split
   into sentences once (the loader then draws from the lists without splitting), quality-flagged,
   and written to a part tar with the unit's counts. A part and its counts land atomically; a unit
   with counts is done.
3. **Shards**: the parts, in unit order, cut into ``--shard-size`` samples per output shard, each
   written atomically; then ``sizes.json`` and ``report.json``.

A run killed at any point resumes with the same command: finished units and shards are kept,
a half-written file never counts, so every sample lands exactly once.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dreamlip.captions import caption_text, split_sentences
from dreamlip.data.records import (
    STATUS_OK,
    SchemaError,
    iter_parquet_rows,
    normalize_fields,
    parquet_module,
    plan_fields,
)
from dreamlip.data.shards import SIZES_FILE
from dreamlip.formats import image_ext, stream_tar, wds_key_ext
from dreamlip.io import atomic_write
from dreamlip.recaption.sources import Unit
from dreamlip.recaption.store import UnitBusy, WorkDir

__all__ = ["FLAGS", "PrepareConfig", "prepare", "quality_flags"]

FLAGS = ("empty", "repeated_sentence", "truncated", "non_language", "boilerplate")
_BINS = 512  # histogram bins: sentences per long caption, words and tokens per sentence (the last bin: 511+)
# Phrases that make a caption say nothing about the image: MLLM refusals and chat filler, and the
# stock-photo text of web alt-texts (CC12M's frequent ones).
_BOILERPLATE = re.compile(
    r"\b(?:i'?m sorry|i cannot|i can't|as an ai\b|unable to (?:see|view|determine)|"
    r"stock (?:photo|image|illustration)|royalty[- ]free|image may contain|click to enlarge|"
    r"photo by|getty ?images|shutterstock|alamy|dreamstime|123rf|istock)",
    re.IGNORECASE,
)
_CLOSED = re.compile(r"[.!?\"')\]»…]\s*$")
_LETTER = re.compile(r"[^\W\d_]")
_SPACE = re.compile(r"\s")


def _url_hash(url: str) -> int:
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


def quality_flags(text: str | list[str] | None, *, long: bool) -> set[str]:
    """The data-quality flags of one caption (docs/prepare.md).

    empty: no word; repeated_sentence: a sentence occurs twice (a long caption's decoding loop);
    truncated: a long caption that stops mid-sentence (cut at the token limit); non_language: under
    half of its visible characters are letters (URLs, codes, symbol runs); boilerplate: a refusal,
    chat filler or stock-photo text.
    """
    whole = caption_text(text).strip()
    if not re.search(r"\w", whole):
        return {"empty"}
    flags = set()
    sentences = split_sentences(text)
    folded = [s.lower().strip(" .") for s in sentences]
    if len(folded) != len(set(folded)):
        flags.add("repeated_sentence")
    # the last sentence as the splitter sees it (an "</s>" tag or a newline ends none)
    if long and not isinstance(text, list) and sentences and not _CLOSED.search(sentences[-1]):
        flags.add("truncated")
    visible = len(whole) - len(_SPACE.findall(whole))
    if len(_LETTER.findall(whole)) < 0.5 * visible:
        flags.add("non_language")
    if _BOILERPLATE.search(whole):
        flags.add("boilerplate")
    return flags


@dataclass(frozen=True)
class PrepareConfig:
    images: Path  # img2dataset's output folder (webdataset tars, <shard>.parquet logs)
    out: Path
    captions: Path | None = None  # a caption file in any layout (docs/data.md); None: the shards' own
    shard_size: int = 10_000
    workers: int = 1
    drop: tuple[str, ...] = ()  # flags whose captions are dropped
    token_sample: float = 0.01  # share of sentences measured in CLIP tokens (0: none)
    work_dir: Path | None = None

    def manifest(self, tars: list[Path]) -> dict[str, Any]:
        return {
            "images": str(self.images.resolve()),
            "tars": [[t.name, t.stat().st_size] for t in tars],
            "captions": None if self.captions is None else [str(self.captions.resolve()), self.captions.stat().st_size],
            "shard_size": self.shard_size,
            "drop": sorted(self.drop),
            "token_sample": self.token_sample,
        }


# --- 1. the join -------------------------------------------------------------------------------


def _logs(tars: list[Path]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """img2dataset's logs as (sorted URL hashes, code per hash, codes): code 0..len(tars)-1 is the
    tar a downloaded URL went to; len(tars)+k is failure status k."""
    hashes, codes, statuses = [], [], []
    for index, tar in enumerate(tars):
        log = tar.with_suffix(".parquet")
        if not log.is_file():
            raise SchemaError(log, None, None, "img2dataset's log of this shard is missing (needed to join by URL)")
        for row in iter_parquet_rows(log, columns=["url", "status"]):
            hashes.append(_url_hash(row["url"]))
            if row["status"] == STATUS_OK:
                codes.append(index)
            else:
                status = str(row["status"])
                if status not in statuses:
                    statuses.append(status)
                codes.append(len(tars) + statuses.index(status))
    order = np.argsort(np.asarray(hashes, dtype=np.uint64), kind="stable")
    return np.asarray(hashes, dtype=np.uint64)[order], np.asarray(codes, dtype=np.int64)[order], statuses


def _caption_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a caption file as dicts of its own columns."""
    import csv
    import sys

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        names = parquet_module().read_schema(path).names
        yield from iter_parquet_rows(path, columns=names)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8-sig") as stream:
            for number, line in enumerate(stream, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SchemaError(path, number, None, f"not valid JSON ({err.msg})") from None
    else:
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as stream:
            reader = csv.DictReader(stream, delimiter="\t" if suffix == ".tsv" else ",")
            for row in reader:
                yield {k: v or None for k, v in row.items() if k not in ("", None, "Unnamed: 0")}


def _join(config: PrepareConfig, tars: list[Path], work: Path) -> dict[str, Any]:
    """Route every caption row to its tar's bucket; counts what matched nothing or failed."""
    done = work / "join.json"
    if done.is_file():
        return json.loads(done.read_text())
    hashes, codes, statuses = _logs(tars)
    buckets = work / "rows"
    for stale in buckets.glob("*.jsonl") if buckets.is_dir() else []:
        stale.unlink()  # a join killed midway starts again: buckets are only trusted once join.json exists
    buckets.mkdir(parents=True, exist_ok=True)
    handles = [open(buckets / f"{t.stem}.jsonl", "w", encoding="utf-8") for t in tars]
    counts = {"rows": 0, "missing": 0, "failed": Counter()}
    url_field = None
    try:
        for row in _caption_rows(config.captions):
            if url_field is None:
                plan = plan_fields(list(row), source=config.captions, line=None)
                url_field = plan.image
            counts["rows"] += 1
            url = row.get(url_field)
            position = np.searchsorted(hashes, np.uint64(_url_hash(url))) if isinstance(url, str) else len(hashes)
            if position == len(hashes) or hashes[position] != np.uint64(_url_hash(url)):
                counts["missing"] += 1
                continue
            code = int(codes[position])
            if code >= len(tars):
                counts["failed"][statuses[code - len(tars)]] += 1
                continue
            handles[code].write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    finally:
        for handle in handles:
            handle.close()
    summary = {"rows": counts["rows"], "missing": counts["missing"], "failed": dict(counts["failed"]), "url_field": url_field}
    atomic_write(done, lambda h: json.dump(summary, h))
    return summary


# --- 2. units ----------------------------------------------------------------------------------


def _histogram(values: Sequence[int]) -> np.ndarray:
    return np.bincount(np.minimum(np.asarray(values, dtype=np.int64), _BINS - 1), minlength=_BINS)


class _Tokens:
    """CLIP BPE token counts, the tokenizer loaded on first use (open_clip is a heavy import)."""

    def __init__(self) -> None:
        self._encode = None

    def __call__(self, text: str) -> int:
        if self._encode is None:
            from dreamlip._compat import ensure_torchvision

            ensure_torchvision()
            from open_clip.tokenizer import SimpleTokenizer

            self._encode = SimpleTokenizer().encode
        return len(self._encode(text))


def _members(tar: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, in tar order."""
    for key, members in stream_tar(tar):
        yield key, {wds_key_ext(name)[1]: data for name, data in members}


def _process_unit(args: tuple[PrepareConfig, Path, Path, Unit]) -> str:
    config, tar, work, unit = args
    store = WorkDir(work)
    try:
        with store.lock(unit.name):
            if not store.unit_done(unit):
                store.mark_done(unit, _write_part(config, tar, work, unit))
    except UnitBusy:
        return "busy"
    return "done"


def _write_part(config: PrepareConfig, tar: Path, work: Path, unit: Unit) -> dict[str, Any]:
    """Join, check, split and flag one img2dataset tar into a part, sample by sample (the tar is
    streamed, never held whole); returns the unit's counts and histograms."""
    started = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    url_field = None
    if config.captions is not None:
        url_field = json.loads((work / "join.json").read_text())["url_field"]
        with open(work / "rows" / f"{tar.stem}.jsonl", encoding="utf-8") as stream:
            rows = {row[url_field]: row for row in map(json.loads, stream)}
    stats = _UnitStats(config)

    def write(handle) -> None:
        with tarfile.open(fileobj=handle, mode="w|") as archive:
            for key, sample in _members(tar):
                meta = json.loads(sample["json"]) if "json" in sample else {}
                if config.captions is not None:
                    row = rows.get(meta.get("url"))
                    if row is None:
                        stats.counts["samples"] += 1
                        stats.counts["unmatched"] += 1  # downloaded, but its URL is not in the caption file
                        continue
                    own = {k: v for k, v in meta.items() if k != url_field}
                    meta = {**own, **{k: v for k, v in row.items() if k != url_field}, "url": meta.get("url")}
                written = stats.record(key, sample, meta)
                if written is None:
                    continue
                ext, record = written
                for suffix, data in ((ext, sample[ext]), ("json", json.dumps(record, ensure_ascii=False).encode())):
                    info = tarfile.TarInfo(f"{stats.counts['written'] - 1:09d}.{suffix}")
                    info.size, info.mode = len(data), 0o644
                    archive.addfile(info, io.BytesIO(data))

    atomic_write(work / "parts" / f"{unit.name}.tar", write, binary=True, locked=True)
    return {**stats.report(), "seconds": time.perf_counter() - started}


class _UnitStats:
    """One unit's samples turned into records, and what was seen on the way."""

    def __init__(self, config: PrepareConfig) -> None:
        self.config, self.drop = config, set(config.drop)
        self.tokens = _Tokens()
        self.counts: Counter[str] = Counter()
        self.flags: Counter[str] = Counter()
        self.per_captioner: Counter[str] = Counter()
        self.sentences_per_long: list[int] = []
        self.words: list[int] = []
        self.token_lengths: list[int] = []

    def record(self, key: str, sample: dict[str, bytes], meta: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """(image extension, record) to write, or None when the sample is skipped (counted)."""
        self.counts["samples"] += 1
        ext = image_ext(sample)
        caption = sample["txt"].decode("utf-8", "surrogateescape").strip() if "txt" in sample else None
        try:
            fields = normalize_fields(meta, source=key, line=None, image_required=False, fallback_raw=caption)
        except SchemaError:
            self.counts["bad_record"] += 1
            return None
        if ext is None or fields["error"] is not None:
            self.counts[fields["error"] or "missing_image"] += 1
            return None
        raw = fields["raw_caption"]
        if raw and self._flagged("raw_caption", raw, long=False):
            raw = None
        captions: dict[str, dict[str, Any]] = {}
        for name, by_length in fields["captions"].items():
            kept: dict[str, Any] = {}
            for length in ("short", "long"):
                text = by_length.get(length)
                if text is None or self._flagged(length, text, long=length == "long"):
                    continue
                kept[length] = self._sentences(text) if length == "long" else caption_text(text)
                self.per_captioner[f"{name}/{length}"] += 1
            if kept:
                captions[name] = {length: kept.get(length) for length in ("short", "long")}
        if not raw and not captions:
            self.counts["no_text"] += 1
            return None
        self.counts["written"] += 1
        record = {"id": fields["id"] or str(meta.get("key") or key), "raw_caption": raw, "captions": captions}
        record.update(fields["extras"])
        return ext, record

    def _flagged(self, kind: str, text: Any, *, long: bool) -> bool:
        """Count the text's flags; whether it is to be dropped."""
        flags = quality_flags(text, long=long)
        self.flags.update(f"{kind}/{flag}" for flag in flags)
        return bool(flags & self.drop)

    def _sentences(self, text: Any) -> list[str]:
        pieces = split_sentences(text)
        self.sentences_per_long.append(len(pieces))
        for piece in pieces:
            self.words.append(len(piece.split()))
            if self.config.token_sample and _url_hash(piece) % 10_000 < self.config.token_sample * 10_000:
                self.token_lengths.append(self.tokens(piece))
        return pieces

    def report(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "flags": dict(self.flags),
            "captions": dict(self.per_captioner),
            "sentences_per_long": _histogram(self.sentences_per_long).tolist(),
            "words_per_sentence": _histogram(self.words).tolist(),
            "tokens_per_sentence": _histogram(self.token_lengths).tolist(),
        }


# --- 3. output shards --------------------------------------------------------------------------


def _write_shards(config: PrepareConfig, parts: list[Path], total: int) -> dict[str, int]:
    """Cut the parts (in unit order) into shards of ``shard_size``; shards already there are kept."""
    names = [f"{index:05d}.tar" for index in range(-(-total // config.shard_size))]
    samples = (list(sample.items()) for part in parts for _, sample in _members(part))
    sizes = {}
    for index, name in enumerate(names):
        first = index * config.shard_size
        sizes[name] = min(config.shard_size, total - first)
        chunk = itertools.islice(samples, sizes[name])
        if (config.out / name).is_file():  # written whole by an earlier run (atomic_write)
            for _ in chunk:
                pass
            continue

        def write(handle, chunk=chunk, first=first) -> None:
            with tarfile.open(fileobj=handle, mode="w|") as archive:
                for offset, members in enumerate(chunk):
                    for ext, data in members:
                        info = tarfile.TarInfo(f"{first + offset:09d}.{ext}")
                        info.size, info.mode = len(data), 0o644
                        archive.addfile(info, io.BytesIO(data))

        atomic_write(config.out / name, write, binary=True, locked=True)
    atomic_write(config.out / SIZES_FILE, lambda h: json.dump(sizes, h, indent=1, sort_keys=True))
    return sizes


# --- the command -------------------------------------------------------------------------------


def _percentiles(histogram: np.ndarray) -> dict[str, int] | None:
    total = int(histogram.sum())
    if total == 0:
        return None
    cumulative = np.cumsum(histogram)
    at = {f"p{q}": int(np.searchsorted(cumulative, q / 100 * total)) for q in (5, 50, 95)}
    return {"count": total, **at, "max": int(np.flatnonzero(histogram)[-1]), "mean": round(float(histogram @ np.arange(_BINS)) / total, 2)}


def prepare(config: PrepareConfig) -> dict[str, Any]:
    """Run (or resume) the whole preparation; returns the report (also ``OUT/report.json``)."""
    if config.shard_size < 1 or config.workers < 1:
        raise ValueError("--shard-size and --workers must be >= 1")
    unknown = sorted(set(config.drop) - set(FLAGS))
    if unknown:
        raise ValueError(f"--drop {', '.join(unknown)}: flags are {', '.join(FLAGS)}")
    tars = sorted(p for p in config.images.glob("*.tar") if not p.name.startswith("."))
    if not tars:
        raise FileNotFoundError(f"{config.images}: no .tar shards (img2dataset --output_format webdataset)")
    work = config.work_dir or config.out / ".prepare-work"
    store = WorkDir(work)
    store.check_manifest(config.manifest(tars))
    started = time.perf_counter()
    join = _join(config, tars, work) if config.captions is not None else None
    units = [Unit(i, tar.name) for i, tar in enumerate(tars)]
    pending = [u for u in units if not store.unit_done(u)]
    tasks = [(config, tars[u.index], work, u) for u in pending]
    units_started = time.perf_counter()
    if config.workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context().Pool(min(config.workers, len(tasks))) as pool:
            busy = [r for r in pool.imap_unordered(_process_unit, tasks) if r == "busy"]
    else:
        busy = [r for r in map(_process_unit, tasks) if r == "busy"]
    if busy:
        raise RuntimeError(f"{len(busy)} units are being prepared by another process: run again when it ends")
    unit_seconds = time.perf_counter() - units_started
    done_now = {u.label for u in pending}
    reports = store.reports()
    counts, flags, per_captioner = Counter(), Counter(), Counter()
    histograms = {k: np.zeros(_BINS, dtype=np.int64) for k in ("sentences_per_long", "words_per_sentence", "tokens_per_sentence")}
    for report in reports:
        counts.update(report["counts"])
        flags.update(report["flags"])
        per_captioner.update(report["captions"])
        for name in histograms:
            histograms[name] += np.asarray(report[name])
    parts = [work / "parts" / f"{u.name}.tar" for u in units]
    sizes = _write_shards(config, parts, counts["written"])
    seconds = time.perf_counter() - started
    samples = counts["samples"]
    report = {
        "rows": join["rows"] if join else samples,
        "images_found": samples - counts["unmatched"] if join else samples,
        "images_missing": join["missing"] if join else 0,
        "images_failed": join["failed"] if join else {},
        "downloaded_not_in_captions": counts["unmatched"],
        "skipped": {k: v for k, v in counts.items() if k not in ("samples", "unmatched", "written") and v},
        "written": counts["written"],
        "shards": len(sizes),
        "captions": dict(sorted(per_captioner.items())),
        "flags": dict(sorted(flags.items())),
        "dropped_flags": sorted(config.drop),
        "sentences_per_long_caption": _percentiles(histograms["sentences_per_long"]),
        "words_per_sentence": _percentiles(histograms["words_per_sentence"]),
        "clip_tokens_per_sentence": _percentiles(histograms["tokens_per_sentence"]),
        "units_this_run": len(pending),
        "seconds": round(seconds, 3),
        "rows_per_second": round(sum(r["counts"].get("samples", 0) for r in reports if r["unit"] in done_now)
                                 / unit_seconds, 1) if pending else None,
        "workers": config.workers,
    }
    atomic_write(config.out / "report.json", lambda h: json.dump(report, h, indent=1))
    return report
