"""The three input kinds, read as numbered units and written back as the same kind.

A *unit* is the grain of sharding, resuming and writing: a chunk of ``chunk_size`` lines of a JSONL
file or of images of a folder, or one webdataset tar. Units are numbered from the input alone, so
every process of a sharded run sees the same units, and a finished unit is written out whole.

- JSONL in, JSONL out: each chunk is written to a staging file and the chunks are concatenated
  into OUT once all are done. Image paths are rewritten relative to OUT. A line that is no
  record (not JSON, not an object) is recorded as failed and left out of OUT (the trainer
  would refuse the whole file); a record with non-UTF-8 bytes is recorded as failed and
  written back byte for byte (the trainer skips it).
- A folder of images in, JSONL out (the trainer reads JSONL, not folders): one record per image
  (the images ``dreamlip.formats.list_images`` lists), ``raw_caption`` from a sidecar
  ``<name>.txt`` when there is one.
- Webdataset tars in, tars out: ``OUT/<same relative path>.tar`` keeps every member and order;
  only ``<key>.json`` is replaced (or added). No concatenation step is needed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from dreamlip.data.records import RAW_CAPTION_FIELDS
from dreamlip.formats import IMAGE_EXTENSIONS, detect_source, image_ext, json_line, list_images, stream_tar, tar_paths, wds_key_ext
from dreamlip.io import BadSample, atomic_write, read_image_file

__all__ = ["InputError", "Sample", "Source", "Unit", "open_input"]

# The fields of image-text layouts that hold the alt-text (img2dataset's "caption", ...). When a
# record has no "raw_caption", the first of them present is renamed to it, so the output states
# its alt-text in the schema's own name.
_ALT_TEXT_FIELDS = tuple(name for name in RAW_CAPTION_FIELDS if name != "raw_caption")


class InputError(ValueError):
    """The input as a whole cannot be read (missing, malformed JSONL line, unknown kind)."""


@dataclass(frozen=True)
class Unit:
    index: int
    label: str  # for messages: "lines 1-1000", "shards/000003.tar"
    size: int | None = None  # number of samples when known without reading the unit (progress bar)

    @property
    def name(self) -> str:
        return f"unit-{self.index:06d}"


@dataclass
class Sample:
    """One image and its record. ``read_image`` raises :class:`BadSample` with the reason (a bad
    image, or a bad record found when reading the input)."""

    key: str
    record: dict[str, Any]
    image_ref: str
    read_image: Callable[[], bytes]
    members: list[tuple[str, bytes]] = field(default_factory=list)  # webdataset only, in tar order
    in_output: bool = True  # False: the input held no record to write back (an unparsable line)


def _fill_raw_caption(record: dict[str, Any], fallback: str | None = None) -> dict[str, Any]:
    if "raw_caption" in record:
        return record
    for name in _ALT_TEXT_FIELDS:
        if isinstance(record.get(name), str):
            return {"raw_caption": record[name], **{k: v for k, v in record.items() if k != name}}
    return {"raw_caption": fallback or "", **record}


def _from_file(path: Path | None) -> Callable[[], bytes]:
    return lambda: read_image_file(path)


def _in_memory(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _refused(reason: str, detail: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise BadSample(reason, detail)

    return read


def _head_tail_digest(path: Path, *, span: int = 1 << 20) -> str:
    """Cheap content fingerprint: size plus the first and last MiB (survives copies, unlike mtime)."""
    digest = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(span))
        handle.seek(max(0, path.stat().st_size - span))
        digest.update(handle.read(span))
    return digest.hexdigest()


class Source(ABC):
    """An input dataset: numbered units, their samples, and writing them back."""

    kind: str

    @abstractmethod
    def units(self) -> list[Unit]: ...

    @abstractmethod
    def samples(self, unit: Unit) -> Iterator[Sample]:
        """The samples of ``unit`` in input order, each with a key unique in the dataset."""

    @abstractmethod
    def write_unit(self, unit: Unit, update: Callable[[Sample], dict[str, Any]], staging: Path) -> None:
        """Write ``unit`` with every record replaced by ``update(sample)``, atomically."""

    @abstractmethod
    def finalize(self, staging: Path) -> None:
        """Assemble the output once every unit is written."""

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a run and its resumption."""


class _RecordListSource(Source):
    """JSONL and folder inputs: chunks of records, written as one JSONL file at ``out``."""

    def __init__(self, base: Path, out: Path, chunk_size: int) -> None:
        self.base = base.resolve()  # what relative image paths of the input are relative to
        self.out = out
        self.chunk_size = chunk_size

    def _rebased(self, record: dict[str, Any]) -> dict[str, Any]:
        """``record`` with a relative image path made relative to the output file instead."""
        image = record.get("image")
        if not isinstance(image, str) or os.path.isabs(image):
            return record
        return {**record, "image": os.path.relpath(self.base / image, self.out.parent.resolve())}

    def _chunk_path(self, staging: Path, unit: Unit) -> Path:
        return staging / f"{unit.name}.jsonl"

    def write_unit(self, unit: Unit, update: Callable[[Sample], dict[str, Any]], staging: Path) -> None:
        def write(handle) -> None:
            for sample in self.samples(unit):
                record = update(sample)  # called for every sample: it records the failures
                if sample.in_output:
                    line = json.dumps(self._rebased(record), ensure_ascii=False) + "\n"
                    # surrogateescape: undecodable input bytes go back out as they came
                    handle.write(line.encode("utf-8", "surrogateescape"))

        atomic_write(self._chunk_path(staging, unit), write, binary=True, locked=True)

    def finalize(self, staging: Path) -> None:
        def write(handle) -> None:
            for unit in self.units():
                with open(self._chunk_path(staging, unit), "rb") as chunk:
                    shutil.copyfileobj(chunk, handle)

        atomic_write(self.out, write, binary=True, locked=True)


class JsonlSource(_RecordListSource):
    kind = "jsonl"

    def __init__(self, path: Path, out: Path, chunk_size: int) -> None:
        super().__init__(path.parent, out, chunk_size)
        self.path = path
        self._units: list[Unit] | None = None
        self._starts: list[tuple[int, int]] = []  # (byte offset, first line number) per unit

    def units(self) -> list[Unit]:
        # One pass over the bytes records where each chunk starts, so a chunk is read by seeking.
        if self._units is None:
            starts, line, offset, blank = [], 0, 0, 0
            with open(self.path, "rb") as handle:
                for raw in handle:
                    if line % self.chunk_size == 0:
                        starts.append((offset, line + 1))
                    line += 1
                    offset += len(raw)
                    blank += not raw.strip()
            if blank == line:
                raise InputError(f"{self.path}: holds no records")
            self._starts = starts
            self._units = []
            for i, (_, first) in enumerate(starts):
                last = min(first + self.chunk_size - 1, line)
                self._units.append(Unit(i, f"{self.path.name} lines {first}-{last}", last - first + 1))
        return self._units

    def samples(self, unit: Unit) -> Iterator[Sample]:
        self.units()
        offset, first = self._starts[unit.index]
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            for number in range(first, first + self.chunk_size):
                raw = handle.readline()
                if not raw:
                    return
                if not raw.strip():
                    continue
                yield self._sample(raw, number)

    def _sample(self, raw: bytes, number: int) -> Sample:
        where = f"{self.path.name}:{number}"
        try:
            record = json_line(raw)  # undecodable bytes kept as surrogates, to be written back
        except ValueError as err:
            problem = f"{where}: {err}"
            return Sample(str(number), {}, f"line {number}", _refused("bad_record", problem), in_output=False)
        if not isinstance(record, dict):
            problem = f"{where}: a record must be a JSON object, got {type(record).__name__}"
            return Sample(str(number), {}, f"line {number}", _refused("bad_record", problem), in_output=False)
        image = record.get("image") if isinstance(record.get("image"), str) else None
        ref = image or f"line {number}"
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            read = _refused("text_encoding", f"{where}: not valid UTF-8 (byte {err.start})")
        else:
            read = _from_file(self.base / image if image else None)
        return Sample(str(number), _fill_raw_caption(record), ref, read)

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve()), "digest": _head_tail_digest(self.path)}


class FolderSource(_RecordListSource):
    kind = "folder"

    def __init__(self, root: Path, out: Path, chunk_size: int) -> None:
        super().__init__(root, out, chunk_size)
        self._files: list[str] | None = None

    def _list(self) -> list[str]:
        if self._files is None:
            found = [str(path.relative_to(self.base)) for path in list_images(self.base)]
            if not found:
                raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.base}")
            self._files = found
        return self._files

    def units(self) -> list[Unit]:
        files = self._list()
        units = []
        for i, start in enumerate(range(0, len(files), self.chunk_size)):
            chunk = files[start : start + self.chunk_size]
            units.append(Unit(i, f"{chunk[0]} .. {chunk[-1]}", len(chunk)))
        return units

    def samples(self, unit: Unit) -> Iterator[Sample]:
        files = self._list()[unit.index * self.chunk_size : (unit.index + 1) * self.chunk_size]
        for rel in files:
            sidecar = (self.base / rel).with_suffix(".txt")
            raw = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
            record = {"id": os.path.splitext(rel)[0], "image": rel, "raw_caption": raw}
            yield Sample(rel, record, rel, _from_file(self.base / rel))

    def fingerprint(self) -> dict[str, Any]:
        listing = hashlib.sha256("\n".join(self._list()).encode()).hexdigest()
        return {"kind": self.kind, "path": str(self.base), "files": len(self._list()), "listing": listing}


class WebDatasetSource(Source):
    kind = "webdataset"

    def __init__(self, tars: list[Path], out: Path) -> None:
        self.tars = [t.resolve() for t in tars]
        common = Path(os.path.commonpath([t.parent for t in self.tars]))
        self.relative = [t.relative_to(common) for t in self.tars]
        self.out = out
        if any((out / rel).resolve() == tar for rel, tar in zip(self.relative, self.tars)):
            raise InputError("--out must not be the input folder: tars are rewritten, not edited in place")

    def units(self) -> list[Unit]:
        return [Unit(i, str(rel)) for i, rel in enumerate(self.relative)]

    def _groups(self, tar_path: Path) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
        try:
            yield from stream_tar(tar_path)
        except (tarfile.TarError, OSError) as err:
            raise InputError(f"cannot read tar {tar_path}: {err}") from None

    def samples(self, unit: Unit) -> Iterator[Sample]:
        # Keys count samples in tar order: a webdataset key may repeat within a tar.
        for ordinal, (key, members) in enumerate(self._groups(self.tars[unit.index])):
            by_ext = {}
            for name, data in members:
                by_ext.setdefault(wds_key_ext(name)[1], data)
            ext = image_ext(by_ext)
            ref = f"{unit.label}:{key}.{ext or '?'}"
            read = _in_memory(by_ext[ext]) if ext else None
            record: Any = {}
            if "json" in by_ext:
                try:
                    record = json.loads(by_ext["json"])
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    record, read = {}, _refused("bad_record", f"{key}.json is not a JSON object")
            if read is None:
                read = _refused("missing_image", f"sample has no image member (has: {', '.join(sorted(by_ext))})")
            text = by_ext.get("txt", b"").decode("utf-8", errors="replace").strip()
            yield Sample(f"{unit.label}:{ordinal}", _fill_raw_caption(record, text), ref, read, members)

    def write_unit(self, unit: Unit, update: Callable[[Sample], dict[str, Any]], staging: Path) -> None:
        def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))

        count = 0

        def write(handle) -> None:
            nonlocal count
            with tarfile.open(fileobj=handle, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                for sample in self.samples(unit):
                    count += 1
                    record = json.dumps(update(sample), ensure_ascii=False).encode()
                    wrote_json = False
                    for name, data in sample.members:
                        if wds_key_ext(name)[1] == "json":
                            data, wrote_json = record, True
                        add(archive, name, data)
                    if not wrote_json:
                        add(archive, f"{wds_key_ext(sample.members[0][0])[0]}.json", record)

        atomic_write(self.out / self.relative[unit.index], write, binary=True, locked=True)
        atomic_write(self._count_path(staging, unit), lambda h: h.write(str(count)), locked=True)

    def _count_path(self, staging: Path, unit: Unit) -> Path:
        return staging / f"{unit.name}.samples"

    def finalize(self, staging: Path) -> None:
        """Write ``sizes.json`` (samples per tar, which the trainer's loader reads) next to the tars.

        The tars themselves were written to OUT as their units finished.
        """
        by_dir: dict[Path, dict[str, int]] = {}
        for unit, rel in zip(self.units(), self.relative):
            count = int(self._count_path(staging, unit).read_text())
            by_dir.setdefault((self.out / rel).parent, {})[rel.name] = count
        for directory, counts in by_dir.items():
            atomic_write(
                directory / "sizes.json", lambda h, c=counts: json.dump(c, h, indent=1, sort_keys=True)
            )

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tars": [[str(rel), tar.stat().st_size] for rel, tar in zip(self.relative, self.tars)],
        }


def open_input(data: str, out: Path, *, chunk_size: int = 1000) -> Source:
    """The input ``data`` names (``dreamlip.formats.detect_source``): a JSONL file, tar shards, or
    a folder of images."""
    if chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {chunk_size}")
    path, kind = Path(data), detect_source(data)
    if kind == "shards":
        try:
            tars = tar_paths(data)
        except FileNotFoundError as err:
            raise InputError(str(err)) from None
        if out.is_file():
            raise InputError(f"--out must be a folder for webdataset input (tars are written into it): {out}")
        return WebDatasetSource(tars, out)
    if out.suffix != ".jsonl":
        raise InputError(f"--out must be a .jsonl file for JSONL or image-folder input: {out}")
    if kind in ("jsonl", "json") and path.is_file():
        if out.resolve() == path.resolve():
            raise InputError("--out must differ from --data: the input is read again when merging")
        return JsonlSource(path, out, chunk_size)
    if kind == "demo":  # a folder of images and masks: its records are in the splits' JSONL
        raise InputError(f"{data} is a demo-data directory: recaption one split's records ({data}/train.jsonl)")
    if kind == "folder":
        return FolderSource(path, out, chunk_size)
    if kind == "missing":
        raise InputError(f"--data not found: {data}")
    raise InputError(f"--data must be a .jsonl file, webdataset .tar shard(s) or a folder of images: {data}")
