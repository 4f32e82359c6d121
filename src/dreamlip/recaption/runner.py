"""The recaption loop: this shard's units, batch by batch, into result parts; then units and merge.

Per unit: skip images that already have this captioner's captions (unless ``overwrite``) and
images recorded by an earlier, killed run; decode the next batch in a background thread while the
model works on this one; generate the long and the short caption; clean them; record the batch as
one part file. When the unit has a result for every image, write it out (a JSONL chunk or a tar)
and mark it done. The process that finds every unit done assembles the output and the summary.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

from tqdm import tqdm

from dreamlip.io import BadSample

from .backends import BackendError, Captioner, Generation, PreparedImage, Request, prepare_image
from .postprocess import clean_caption
from .sources import Sample, Source, Unit
from .store import UnitBusy, WorkDir

__all__ = [
    "DEFAULT_PROMPT_LONG",
    "DEFAULT_PROMPT_SHORT",
    "RecaptionConfig",
    "Unfinished",
    "apply_result",
    "merge",
    "recaption",
    "shard_units",
]

# The paper's prompts (DreamLIP, Sec. 3.1).
DEFAULT_PROMPT_LONG = "Describe the image in detail."
DEFAULT_PROMPT_SHORT = "Describe the image in one sentence."

T = TypeVar("T")


class Unfinished(RuntimeError):
    """A merge was asked for while some units are not written yet."""


@dataclass(frozen=True)
class RecaptionConfig:
    captioner: str
    prompt_long: str = DEFAULT_PROMPT_LONG
    prompt_short: str = DEFAULT_PROMPT_SHORT
    max_new_tokens: int = 512
    max_new_tokens_short: int = 96
    batch_size: int = 8
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    max_side: int = 0
    progress: bool = True

    def manifest(self, source: Source, chunk_size: int) -> dict[str, Any]:
        """The settings every process and every resumption of one run must share."""
        return {
            "captioner": self.captioner,
            "prompt_long": self.prompt_long,
            "prompt_short": self.prompt_short,
            "overwrite": self.overwrite,
            "chunk_size": chunk_size if source.kind != "webdataset" else None,
            "input": source.fingerprint(),
        }


def shard_units(units: list[Unit], shard: tuple[int, int]) -> list[Unit]:
    """Unit ``k`` belongs to shard ``k mod n``: n shards are disjoint and together cover every unit."""
    index, count = shard
    return [u for u in units if u.index % count == index]


def needs_caption(record: dict[str, Any], captioner: str, overwrite: bool) -> bool:
    captions = record.get("captions")
    return overwrite or not (isinstance(captions, dict) and captioner in captions)


def apply_result(record: dict[str, Any], captioner: str, result: dict[str, Any]) -> dict[str, Any]:
    """``record`` with this captioner's result; every other field and captioner is kept as it was.

    The trainer's schema allows only ``short`` and ``long`` under ``captions.<captioner>``, so the
    raw text, the model and a failure reason go under ``generated.<captioner>``.
    """
    captions, generated = record.get("captions", {}), record.get("generated", {})
    if not isinstance(captions, dict) or not isinstance(generated, dict):
        return record  # the failure is in failures.jsonl; the record is left as it came
    if "error" in result:
        return {**record, "generated": {**generated, captioner: {"error": result["error"]}}}
    return {
        **record,
        "captions": {**captions, captioner: {"short": result["short"], "long": result["long"]}},
        "generated": {**generated, captioner: {"model": result["model"], "raw": result["raw"]}},
    }


def _prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, ``depth`` ahead: image decoding overlaps generation."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def fill() -> None:
        try:
            for item in items:
                buffer.put((item, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            buffer.put((None, err))
        buffer.put((done, None))

    threading.Thread(target=fill, daemon=True).start()
    while True:
        item, err = buffer.get()
        if err is not None:
            raise err
        if item is done:
            return
        yield item


def _prepared(sample: Sample, max_side: int) -> PreparedImage | str:
    """The decoded image, or the reason it cannot be used ("<reason>: <detail>", as the trainer's)."""
    for name in ("captions", "generated"):
        if not isinstance(sample.record.get(name, {}), dict):
            return f"bad_record: field {name!r} is not an object"
    try:
        return prepare_image(sample.read_image(), max_side=max_side)
    except BadSample as err:
        return str(err)


class _Run:
    def __init__(
        self, source: Source, work: WorkDir, make_backend: Callable[[], Captioner], config: RecaptionConfig
    ):
        self.source, self.work, self.config = source, work, config
        self._make_backend = make_backend
        self.backend: Captioner | None = None
        self.counts: Counter = Counter()
        self.seconds = 0.0  # wall time spent captioning, model loading excluded
        self.any_success = False
        self.decoder = ThreadPoolExecutor(max_workers=4)

    def _batches(self, unit: Unit, bar: tqdm) -> Iterator[list[tuple[Sample, PreparedImage | str]]]:
        done = self.work.results(unit)
        self.counts["resumed"] += len(done)
        batch: list[Sample] = []
        for sample in self.source.samples(unit):
            if not needs_caption(sample.record, self.config.captioner, self.config.overwrite):
                self.counts["skipped"] += 1
                bar.update(1)
            elif sample.key in done:
                bar.update(1)
            else:
                batch.append(sample)
                if len(batch) == self.config.batch_size:
                    yield self._decode(batch)
                    batch = []
        if batch:
            yield self._decode(batch)

    def _decode(self, batch: list[Sample]) -> list[tuple[Sample, PreparedImage | str]]:
        images = self.decoder.map(lambda s: _prepared(s, self.config.max_side), batch)
        return list(zip(batch, images))

    def _caption(self, batch: list[tuple[Sample, PreparedImage | str]]) -> list[dict[str, Any]]:
        config = self.config
        usable = [(s, image) for s, image in batch if isinstance(image, PreparedImage)]
        generated: dict[str, tuple[Generation, Generation]] = {}
        if usable:
            if self.backend is None:
                start = time.perf_counter()
                self.backend = self._make_backend()
                self.seconds -= time.perf_counter() - start
            requests = [Request(image, config.prompt_long, config.max_new_tokens) for _, image in usable]
            requests += [
                Request(image, config.prompt_short, config.max_new_tokens_short) for _, image in usable
            ]
            outputs = self.backend.generate(requests)
            for i, (sample, _) in enumerate(usable):
                generated[sample.key] = (outputs[i], outputs[i + len(usable)])
        results = []
        for sample, image in batch:
            result: dict[str, Any] = {"key": sample.key, "image": sample.image_ref}
            if isinstance(image, str):
                result["error"] = image
            else:
                result.update(self._captions(*generated[sample.key]))
            results.append(result)
        failed_by_backend = [
            r for r, (_, image) in zip(results, batch) if "error" in r and not isinstance(image, str)
        ]
        self.any_success = self.any_success or any("error" not in r for r in results)
        if usable and len(failed_by_backend) == len(usable) > 1 and not self.any_success:
            # Nothing has worked yet and a whole batch failed: a setup problem, not bad images.
            raise BackendError(
                f"every image of the first batch failed ({failed_by_backend[0]['error']}); stopping instead "
                "of recording the same failure for every image"
            )
        return results

    def _captions(self, long: Generation, short: Generation) -> dict[str, Any]:
        # Reasons read "<reason>: <detail> [<which> caption]"; the summary counts failures by reason.
        for name, generation in (("long", long), ("short", short)):
            if generation.error:
                return {"error": f"{generation.error} [{name} caption]"}
        cleaned = {
            "long": clean_caption(long.text, truncated=long.truncated),
            "short": clean_caption(short.text, truncated=short.truncated),
        }
        for name, text in cleaned.items():
            if not text:
                generation = long if name == "long" else short
                if generation.truncated:
                    flag = "--max-new-tokens" + ("-short" if name == "short" else "")
                    return {"error": f"token_limit: cut at the token limit ({flag}) before a sentence ended: "
                            f"{generation.text[:80]!r} [{name} caption]"}
                return {"error": f"empty_caption: nothing left after cleaning: {generation.text[:80]!r} [{name} caption]"}
        assert self.backend is not None
        return {**cleaned, "raw": {"long": long.text, "short": short.text}, "model": self.backend.model_id}

    @property
    def images_per_second(self) -> float | None:
        processed = self.counts["captioned"] + self.counts["failed"]
        return processed / self.seconds if processed and self.seconds > 0 else None

    def process(self, unit: Unit, bar: tqdm) -> None:
        last = time.perf_counter()
        for batch in _prefetch(self._batches(unit, bar)):
            results = self._caption(batch)
            self.work.write_part(unit, results)
            failed = sum("error" in r for r in results)
            self.counts["failed"] += failed
            self.counts["captioned"] += len(results) - failed
            bar.update(len(results))
            now = time.perf_counter()
            self.seconds, last = self.seconds + now - last, now
            rate = self.images_per_second
            if rate:
                bar.set_postfix_str(f"{rate:.2f} img/s captioned, {self.counts['failed']} failed")
        self._write_unit(unit)

    def _write_unit(self, unit: Unit) -> None:
        results = self.work.results(unit)
        seen: set[str] = set()
        report: Counter = Counter()
        failures = []

        def update(sample: Sample) -> dict[str, Any]:
            if not needs_caption(sample.record, self.config.captioner, self.config.overwrite):
                report["skipped"] += 1
                return sample.record
            if sample.key not in results:
                raise RuntimeError(f"{unit.label}: no result recorded for {sample.image_ref}")
            if sample.key in seen:
                raise RuntimeError(f"{unit.label}: key {sample.key!r} appears twice in the input")
            seen.add(sample.key)
            result = results[sample.key]
            if "error" in result:
                report["failed"] += 1
                failures.append({"key": sample.key, "image": sample.image_ref, "reason": result["error"]})
            else:
                report["captioned"] += 1
            return apply_result(sample.record, self.config.captioner, result)

        self.source.write_unit(unit, update, self.work.staging)
        extra = set(results) - seen
        if extra:
            raise RuntimeError(f"{unit.label}: results for keys not in the input: {sorted(extra)[:5]}")
        self.work.mark_done(
            unit, {**{k: report[k] for k in ("captioned", "failed", "skipped")}, "failures": failures}
        )

    def close(self) -> None:
        self.decoder.shutdown()
        if self.backend is not None:
            self.backend.close()


def recaption(
    source: Source, work: WorkDir, make_backend: Callable[[], Captioner], config: RecaptionConfig
) -> dict[str, Any]:
    """Caption this process's shard of ``source``; merge when every shard is done.

    ``make_backend`` is called only once there is an image to caption, so a finished or fully
    resumed shard never loads a model. Returns this shard's summary (also written to the work dir).
    """
    units = shard_units(source.units(), config.shard)
    pending = [u for u in units if not work.unit_done(u)]
    run = _Run(source, work, make_backend, config)
    busy = []
    started = time.perf_counter()
    sizes = [u.size for u in pending]
    bar = tqdm(
        total=None if None in sizes else sum(sizes),
        unit="img",
        desc=f"recaption {config.captioner} shard {config.shard[0]}/{config.shard[1]}",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    try:
        for unit in pending:
            try:
                with work.lock(unit.name):
                    if not work.unit_done(unit):  # another process may have finished it meanwhile
                        run.process(unit, bar)
            except UnitBusy:
                busy.append(unit.label)
    finally:
        bar.close()
        run.close()
    summary = {
        "shard": f"{config.shard[0]}/{config.shard[1]}",
        "units": len(units),
        "units_written_before": len(units) - len(pending),
        "units_busy_elsewhere": busy,
        "captioned": run.counts["captioned"],
        "failed": run.counts["failed"],
        "skipped_existing": run.counts["skipped"],
        "resumed": run.counts["resumed"],
        "seconds": round(time.perf_counter() - started, 3),
        "captioning_seconds": round(run.seconds, 3),
        "images_per_second": round(run.images_per_second, 3) if run.images_per_second else None,
    }
    work.write_summary(f"summary-shard-{config.shard[0]}-of-{config.shard[1]}.json", summary)
    summary["merged"] = merge(source, work) if all(work.unit_done(u) for u in source.units()) else None
    return summary


def merge(source: Source, work: WorkDir) -> dict[str, Any]:
    """Assemble the output from finished units and write ``summary.json`` and ``failures.jsonl``.

    Raises :class:`Unfinished` naming units still missing. Safe to repeat: the result is the same.
    """
    units = source.units()
    missing = [u.label for u in units if not work.unit_done(u)]
    if missing:
        raise Unfinished(f"{len(missing)} of {len(units)} units are not finished, e.g. {missing[:3]}")
    with work.lock("merge", wait=True):
        source.finalize(work.staging)
        reports = work.reports()
        failures = [f for r in reports for f in r["failures"]]
        summary = {
            "images": sum(r["captioned"] + r["failed"] + r["skipped"] for r in reports),
            **{k: sum(r[k] for r in reports) for k in ("captioned", "failed", "skipped")},
            "failure_reasons": dict(Counter(f["reason"].split(":")[0] for f in failures).most_common(10)),
        }
        work.write_failures(failures)
        work.write_summary("summary.json", summary)
        work.clear_parts()
    return summary
