"""The work folder of a recaption run: its settings, per-batch result parts, locks and unit markers.

Layout (default ``<OUT>.work/``)::

    manifest.json                 settings a resumed or sharded run must share
    parts/unit-000012/part-000003.jsonl   results of one batch, written atomically
    done/unit-000012.json         the unit is written out; counts and failures
    staging/unit-000012.jsonl     finished JSONL chunks, concatenated into OUT at the end
    locks/unit-000012.lock        held (flock) by the one process working on the unit
    summary.json, failures.jsonl  written when every unit is done

Exactly-once: a batch's results land in one part file by rename, so a kill leaves the batch
either fully recorded or not at all; a resumed run skips recorded keys; only the process holding a
unit's lock writes its parts; the unit is written out only when every image in it has exactly one
result, and the marker is written after the output, so a kill in between just repeats the write.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from dreamlip.io import atomic_write, file_lock

from .sources import Unit

__all__ = ["ManifestMismatch", "UnitBusy", "WorkDir"]


class ManifestMismatch(RuntimeError):
    """The work folder was started with other settings (captioner, prompts, input, chunking)."""


class UnitBusy(RuntimeError):
    """Another process holds the unit's lock."""


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, lambda handle: json.dump(value, handle, ensure_ascii=False, indent=1))


class WorkDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / "staging"

    def check_manifest(self, manifest: dict[str, Any]) -> None:
        """Record ``manifest`` on the first run; on later runs, refuse different settings."""
        path = self.root / "manifest.json"
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            # Several shards may start at once: link() publishes the file only if none exists yet.
            tmp = self.root / f".manifest.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        recorded = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(recorded) | set(manifest) if recorded.get(k) != manifest.get(k))
        if changed:
            details = "; ".join(f"{k}: was {recorded.get(k)!r}, now {manifest.get(k)!r}" for k in changed)
            raise ManifestMismatch(
                f"{self.root} belongs to a run with other settings ({details}). Use the same settings "
                "to resume, or another --out / --work-dir to start afresh."
            )

    @contextmanager
    def lock(self, name: str, *, wait: bool = False) -> Iterator[None]:
        """Hold an exclusive lock on ``locks/<name>.lock``.

        Without ``wait``, raise :class:`UnitBusy` at once when another process holds it.
        """
        with ExitStack() as stack:
            try:
                stack.enter_context(file_lock(self.root / "locks" / f"{name}.lock", wait=wait))
            except BlockingIOError:  # only the lock's own refusal, not the caller's block
                raise UnitBusy(name) from None
            yield

    def _parts(self, unit: Unit) -> Path:
        return self.root / "parts" / unit.name

    def _marker(self, unit: Unit) -> Path:
        return self.root / "done" / f"{unit.name}.json"

    def unit_done(self, unit: Unit) -> bool:
        return self._marker(unit).exists()

    def results(self, unit: Unit) -> dict[str, dict[str, Any]]:
        """Every recorded result of ``unit`` by key; a key recorded twice is an error."""
        found: dict[str, dict[str, Any]] = {}
        folder = self._parts(unit)
        for part in sorted(folder.glob("part-*.jsonl")) if folder.is_dir() else []:
            with open(part, encoding="utf-8") as handle:
                for line in handle:
                    result = json.loads(line)
                    if result["key"] in found:
                        raise RuntimeError(f"{part}: {result['key']!r} recorded twice in {folder}")
                    found[result["key"]] = result
        return found

    def write_part(self, unit: Unit, results: list[dict[str, Any]]) -> None:
        """Record one batch of results as a new part file, atomically. Caller holds the unit lock."""
        folder = self._parts(unit)
        folder.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.jsonl")]
        path = folder / f"part-{max(numbers, default=-1) + 1:06d}.jsonl"

        def write(handle) -> None:
            for result in results:
                handle.write(json.dumps(result, ensure_ascii=False) + "\n")

        atomic_write(path, write, locked=True)

    def mark_done(self, unit: Unit, report: dict[str, Any]) -> None:
        """Mark ``unit`` written out; its parts are then no longer needed."""
        _write_json(self._marker(unit), {"unit": unit.label, **report})
        shutil.rmtree(self._parts(unit), ignore_errors=True)

    def clear_parts(self) -> None:
        """Remove parts left by a kill between a unit's marker and its cleanup (all units done)."""
        shutil.rmtree(self.root / "parts", ignore_errors=True)

    def reports(self) -> list[dict[str, Any]]:
        folder = self.root / "done"
        return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("unit-*.json"))]

    def write_summary(self, name: str, summary: dict[str, Any]) -> Path:
        path = self.root / name
        _write_json(path, summary)
        return path

    def write_failures(self, failures: list[dict[str, Any]]) -> Path:
        path = self.root / "failures.jsonl"
        atomic_write(path, lambda h: h.writelines(json.dumps(f, ensure_ascii=False) + "\n" for f in failures))
        return path
