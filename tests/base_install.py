"""Run Python as on a base install (``pip install dreamlip``, no extras).

Modules that only distributions outside dreamlip's base dependencies (and theirs) provide cannot
be imported, whatever else this environment has installed::

    python tests/base_install.py -m dreamlip.cli demo --out /tmp/demo
    python tests/base_install.py -c "import transformers"   # ModuleNotFoundError
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import re
import runpy
import sys
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_distributions() -> set[str]:
    """Canonical names of the distributions a base install holds: dreamlip and its dependencies,
    recursively, without any extra."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    found = {_canonical(project["name"])}
    while todo:
        requirement = todo.pop()
        name = _canonical(requirement.name)
        if name in found or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        found.add(name)
        try:
            todo += [Requirement(r) for r in metadata.requires(requirement.name) or []]
        except metadata.PackageNotFoundError:
            pass  # not installed here: nothing of it can be imported anyway
    return found


def blocked_modules() -> set[str]:
    """Top-level modules that only distributions outside the base install provide."""
    base = base_distributions()
    return {
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(_canonical(d) in base for d in dists)
    }


class _BaseInstallOnly:
    def __init__(self, blocked: set[str]):
        self.blocked = blocked

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not part of the base install)", name=name)
        return None  # let the normal finders look


def _find_spec_as_on_a_base_install(find_spec):
    """``importlib.util.find_spec`` answers None for a module a base install lacks (torch's dynamo
    asks it about optional modules such as pandas), where the finder above raises for imports."""

    def wrapped(name, package=None):
        try:
            return find_spec(name, package)
        except ModuleNotFoundError as err:
            if "(not part of the base install)" in str(err):
                return None
            raise

    return wrapped


def main(argv: list[str]) -> None:
    sys.meta_path.insert(0, _BaseInstallOnly(blocked_modules()))
    importlib.util.find_spec = _find_spec_as_on_a_base_install(importlib.util.find_spec)
    if argv[:1] == ["-m"]:
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[:1] == ["-c"]:
        sys.argv = ["-c", *argv[2:]]
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        raise SystemExit(f"usage: {sys.argv[0]} -m MODULE [ARGS] | -c CODE")


if __name__ == "__main__":
    main(sys.argv[1:])
