"""Webdataset shards: writing records into them and streaming records back out.

A sample is ``<key>.<image extension>`` (one of ``dreamlip.formats.IMAGE_EXTENSIONS``) plus
``<key>.json`` holding the record's fields (``raw_caption``, ``captions``, ``id`` and the
optional ones). Which shards a dataloader worker reads is decided here: split across ranks and
workers without overlap, or resampled with replacement for "virtual epochs" as open_clip's
``--dataset-resampled`` does.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from ..formats import IMAGE_EXTENSIONS, expand_shards, image_ext
from ..io import BadSample, atomic_write, decode_image
from .records import Record, SchemaError, normalize_fields

__all__ = ["ShardSource", "write_shards"]

SIZES_FILE = "sizes.json"  # {shard basename: sample count}, the layout open_clip reads
# Random streams start from (seed, purpose, ...), purposes distinct from loader.py's.
_ORDER, _SHUFFLE, _RESAMPLE = 1, 2, 3


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _image_member(record: Record) -> tuple[str, bytes] | None:
    """The image as (extension, bytes) for a tar member; None leaves the sample without one."""
    if isinstance(record.image, bytes):
        data = record.image
    elif record.image is None or not os.path.isfile(record.image):
        return None
    else:
        data = Path(record.image).read_bytes()
    ext = Path(record.image).suffix.lower().lstrip(".") if isinstance(record.image, str) else ""
    if ext in IMAGE_EXTENSIONS:
        return ext, data
    try:  # other formats are stored as PNG (lossless, so pixels are unchanged)
        buffer = io.BytesIO()
        decode_image(data).save(buffer, "PNG")
        return "png", buffer.getvalue()
    except BadSample:  # keep the bad bytes: the reader counts them like any other bad image
        return "png", data


def write_shards(records: Iterable[Record], pattern: str, maxcount: int = 10_000) -> list[str]:
    """Write records to tar shards named ``pattern % shard_number`` (e.g. ``out/%06d.tar``).

    Bad content is written as it is (a missing image leaves the sample without an image member),
    so that the reader skips and counts it exactly as the record reader would. Records' ``mask``
    files are not copied. Also writes/updates ``sizes.json`` next to the shards. Returns the
    shard paths.
    """
    try:
        pattern % 0
    except TypeError:
        raise ValueError(f"shard pattern {pattern!r} needs one %-placeholder, e.g. 'out/%06d.tar'") from None
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    written: dict[str, int] = {}
    writer = None
    try:
        for ordinal, record in enumerate(records):
            if ordinal % maxcount == 0:
                if writer is not None:
                    writer.close()
                path = pattern % len(written)
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                writer = wds.TarWriter(path, encoder=False, mtime=0)  # mtime: byte-identical reruns
                written[path] = 0
            fields: dict[str, Any] = {
                "id": record.key,
                "raw_caption": record.raw_caption,
                "captions": record.captions,
            }
            fields.update((k, v) for k, v in record.extras.items() if k != "mask")
            # surrogateescape gives non-UTF-8 text its original bytes back, so it stays detectable.
            sample = {
                "__key__": f"{ordinal:09d}",  # record keys may hold dots, which webdataset splits on
                "json": json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogateescape"),
            }
            image = _image_member(record)
            if image is not None:
                sample[image[0]] = image[1]
            writer.write(sample)
            written[path] += 1
    finally:
        if writer is not None:
            writer.close()
    by_dir: dict[Path, dict[str, int]] = {}
    for path, count in written.items():
        by_dir.setdefault(Path(path).parent, {})[Path(path).name] = count
    for directory, counts in by_dir.items():
        sizes_path = directory / SIZES_FILE
        sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
        sizes.update(counts)
        atomic_write(sizes_path, lambda handle: json.dump(sizes, handle, indent=1, sort_keys=True))
    return list(written)


def record_from_sample(sample: dict[str, Any], *, strict: bool = False) -> Record:
    """A Record from one webdataset sample (``__key__``, an image member, and ``.json`` metadata
    and/or a ``.txt`` caption, as img2dataset and Hugging Face's ``*-wds`` repos write them).

    Mid-stream a bad sample becomes a Record carrying its skip reason; ``strict`` (used on the
    first sample, to refuse a wrong layout at start) raises :class:`SchemaError` instead.
    """
    return _sample_fields(sample, strict=strict)[0]


def _sample_fields(sample: dict[str, Any], *, strict: bool = False) -> tuple[Record, tuple[str, ...]]:
    """The Record and the sample's unread caption-like fields."""
    where = f"{sample.get('__url__')} (sample {sample.get('__key__')!r})"
    ext = image_ext(sample)
    image = sample[ext] if ext else None
    key = str(sample.get("__key__"))

    def bad(reason: str, field: str | None, problem: str) -> tuple[Record, tuple[str, ...]]:
        if strict:
            raise SchemaError(where, None, field, problem)
        return Record(key=key, image=image, raw_caption=None, captions={}, error=reason), ()

    caption = None
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8", "surrogateescape").strip()
    if "json" not in sample and caption is None:
        members = ", ".join(k for k in sample if not k.startswith("__")) or "none"
        return bad("bad_record", None, f"no .json or .txt member (members: {members})")
    obj: Any = {}
    if "json" in sample:
        try:
            obj = json.loads(sample["json"].decode("utf-8", "surrogateescape"))
        except json.JSONDecodeError as err:
            return bad("bad_record", None, f".json is not valid JSON ({err.msg})")
    try:
        fields = normalize_fields(obj, source=where, line=None, image_required=False, fallback_raw=caption)
    except SchemaError as err:
        if strict:
            raise
        return bad("bad_record", err.field, err.problem)
    record = Record(
        key=fields["id"] if fields["id"] is not None else key,
        image=image,
        raw_caption=fields["raw_caption"],
        captions=fields["captions"],
        extras=fields["extras"],
        error=fields["error"],
    )
    return record, fields["unread"]


def _read(urls: Iterable[str]) -> Iterator[Record]:
    """Records from shards in order. A shard with read errors (missing, not a tar, truncated) adds
    one ``corrupt_shard`` record after whatever could be read from it; reading goes on."""
    errors: list[Exception] = []

    def handler(err: Exception) -> bool:
        errors.append(err)
        return True  # keep going: the rest of the shard, then the next one

    for url in urls:
        errors.clear()
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=handler):
            yield record_from_sample(sample)
        if errors:
            yield Record(key=url, image=None, raw_caption=None, captions={}, error="corrupt_shard")


@dataclass(frozen=True)
class ShardSource:
    """A list of shards, read as an endless record stream per (rank, worker).

    ``resample=False``: each epoch the shard list is shuffled (the same on every rank) and dealt
    out, shard ``i`` to reader ``i mod (world_size * num_workers)``; a reader that runs out starts
    its shards again in a new order, so every reader can fill the epoch's batches.
    ``resample=True``: each reader draws shards with replacement from its own seeded stream.
    """

    urls: tuple[str, ...]
    resample: bool = False
    size: int | None = None  # samples in all shards, when known (sizes.json, img2dataset's stats, samples=N)
    unread: tuple[str, ...] = ()  # the first sample's fields that look like captions but are not read

    @classmethod
    def open(cls, pattern: str, *, resample: bool = False, size: int | None = None) -> ShardSource:
        """Expand the pattern, check local shards exist and the first sample has the right schema."""
        urls = tuple(expand_shards(pattern))
        missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(urls)} shards of {pattern!r} not found, e.g. {missing[0]}"
            )
        try:
            first = next(iter(wds.tariterators.tarfile_samples([{"url": urls[0]}])), None)
        except Exception as err:  # tarfile/gopen errors: say which shard, not where in webdataset
            raise SchemaError(urls[0], None, None, f"can't read shard: {err}") from None
        if first is None:
            raise SchemaError(urls[0], None, None, "shard holds no samples")
        _, unread = _sample_fields(first, strict=True)
        return cls(urls=urls, resample=resample, size=size if size is not None else _sizes(urls), unread=unread)

    def records(
        self,
        *,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        worker: int,
        num_workers: int,
        shuffle_buffer: int = 1000,
        draw: int = 0,
    ) -> Iterator[Record]:
        """This reader's endless, shuffled record stream for one epoch: the same every time it
        is asked for, so a resumed run can replay it; another ``draw`` gives another stream.
        """
        readers = world_size * num_workers
        slot = rank * num_workers + worker
        if self.resample:
            rng = np.random.default_rng((seed, _RESAMPLE, epoch, draw, slot))
            yield from shuffled(self._resampled(rng), shuffle_buffer, rng)
            return
        if len(self.urls) < readers:
            raise ValueError(f"{len(self.urls)} shards can't be split over {readers} readers; use resample=1")
        for cycle in itertools.count():
            order = np.random.default_rng((seed, _ORDER, epoch, draw, cycle)).permutation(
                len(self.urls)
            )
            # The buffer is emptied at the end of each pass, so a pass is a whole permutation of
            # this reader's samples: no sample repeats before all of them were seen.
            rng = np.random.default_rng((seed, _SHUFFLE, epoch, draw, cycle, slot))
            count = 0
            for record in shuffled(_read([self.urls[i] for i in order[slot::readers]]), shuffle_buffer, rng):
                count += 1
                yield record
            if count == 0:
                raise RuntimeError(f"shards {self.urls[order[slot]]}... gave no samples at all")

    def _resampled(self, rng: np.random.Generator) -> Iterator[Record]:
        empty_draws = 0
        while empty_draws < 100 + 10 * len(self.urls):
            count = 0
            for record in _read([self.urls[rng.integers(len(self.urls))]]):
                count += 1
                yield record
            empty_draws = 0 if count else empty_draws + 1
        raise RuntimeError(f"shards of {self.urls[0]}... gave no samples in {empty_draws} draws")


def shuffled(records: Iterator[Record], size: int, rng: np.random.Generator) -> Iterator[Record]:
    """A shuffle buffer: a shard holds neighbouring samples together; this breaks them up."""
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = record
    rng.shuffle(buffer)
    yield from buffer


def _sizes(urls: tuple[str, ...]) -> int | None:
    """Total sample count of local shards from the ``sizes.json`` beside them, else from
    img2dataset's ``<shard>_stats.json`` (its ``successes`` are the samples in the tar); None if
    any shard's count is unknown."""
    total = 0
    cache: dict[str, dict[str, int]] = {}
    for url in urls:
        if not _is_local(url):
            return None
        directory = os.path.dirname(url)
        if directory not in cache:
            path = os.path.join(directory, SIZES_FILE)
            cache[directory] = json.loads(Path(path).read_text()) if os.path.isfile(path) else {}
        count = cache[directory].get(os.path.basename(url))
        if count is None:
            count = _img2dataset_count(url)
        if count is None:
            return None
        total += int(count)
    return total


def _img2dataset_count(url: str) -> int | None:
    stats = Path(url).with_name(Path(url).name.removesuffix(".tar") + "_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
