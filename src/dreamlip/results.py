"""Result files: each measurement with what reproduces it.

The README's and docs' result tables are rendered from JSON files under ``bench/results/``
(``python bench/render_results.py``). Every run recorded there carries its provenance: the command
that made it, the commit it ran on (``+dirty`` when the tracked files differed from it) and the
machine. A figure is dated by those, never by who measured it when.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from dreamlip import __version__
from dreamlip.io import atomic_write, file_lock

__all__ = ["commit", "machine", "provenance", "record_run"]


def commit(directory: str | Path | None = None) -> str:
    """The git commit of the checkout holding ``directory`` (default: this package), with
    ``+dirty`` when tracked files differ from it; ``dreamlip <version>`` outside a checkout."""
    where = Path(directory) if directory else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return f"dreamlip {__version__}"
    return head + ("+dirty" if dirty else "")


def machine() -> str:
    """One line: the CPU model and core count, the accelerator if any, the OS and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    parts = [f"{os.cpu_count()} CPU cores ({cpu})"]
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        parts.append(f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}")
    parts.append(f"{platform.system()} {platform.machine()}")
    if torch is not None:
        parts.append(f"torch {torch.__version__}")
    return ", ".join(parts)


def provenance(argv: list[str] | None = None, program: str | None = None) -> dict[str, str]:
    """``{"command", "commit", "machine"}`` of this process (``argv`` defaults to ``sys.argv``;
    ``program`` replaces its first word, e.g. ``dreamlip`` for a console script's full path)."""
    argv = list(sys.argv if argv is None else argv)
    if program is not None:
        argv[0] = program
    elif argv and argv[0].endswith(".py"):  # a script of this checkout, as run from its root
        script = Path(argv[0]).resolve()
        checkout = Path(__file__).resolve().parents[2]
        argv = ["python", str(script.relative_to(checkout)) if script.is_relative_to(checkout) else argv[0], *argv[1:]]
    return {"command": shlex.join(argv), "commit": commit(), "machine": machine()}


def record_run(path: str | Path, key: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Merge ``entry`` into ``path``'s run ``key`` and return all its runs. The file is read again
    under a lock, so processes sharing it keep each other's runs, and replaced atomically, so a
    killed run never leaves it half-written."""
    path = Path(path)
    with file_lock(path.with_name(f".{path.name}.lock")):
        runs = json.loads(path.read_text()) if path.exists() else {}
        runs[key] = runs.get(key, {}) | entry
        atomic_write(path, lambda f: f.write(json.dumps(runs, indent=1, sort_keys=True) + "\n"))
    return runs
