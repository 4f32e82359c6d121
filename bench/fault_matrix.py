"""The injected-fault matrix: every test marked ``fault(name)`` run as one matrix, printed as
fault, what the code did (the test's own words, its ``observe(...)``), and held or broken.

Each fault is injected for real by its test: a forced NaN loss term or gradient and a huge
learning rate in training, a writer that fails with ENOSPC and a small tmpfs, a fake server on
127.0.0.1 sending broken gzip, bad JSON, HTML, no choices, no text, cut-off captions or a reply
dripped a few bytes a second, oversized and concurrent requests to ``dreamlip serve``, a missing or
truncated image and a broken JSONL line for ``dreamlip eval``, and a DDP rank frozen with SIGSTOP.

    python bench/fault_matrix.py               # every fault (about 2 minutes on 2 CPU cores)
    python bench/fault_matrix.py --quick       # leave out the slow ones (servers, subprocesses, ranks)

Exit status 0 when every fault held, 1 when one broke.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class Matrix:
    """A pytest plugin that keeps, per fault-marked test, the fault, what it observed and the outcome."""

    def __init__(self):
        self.faults: dict[str, str] = {}
        self.rows: list[tuple[str, str, str]] = []

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marker = item.get_closest_marker("fault")
            if marker is not None:
                self.faults[item.nodeid] = marker.args[0]

    def pytest_runtest_logreport(self, report):
        fault = self.faults.get(report.nodeid)
        if fault is None or not (report.when == "call" or report.outcome != "passed"):
            return
        observed = dict(report.user_properties).get("observed", "")
        if report.skipped:
            verdict, observed = "not run", report.longrepr[2] if isinstance(report.longrepr, tuple) else "skipped"
        elif report.failed:
            verdict = "BROKEN"
            crash = getattr(report.longrepr, "reprcrash", None)
            observed = (crash.message if crash else str(report.longrepr)).splitlines()[0]
        else:
            verdict = "held"
        observed = re.sub(r"\S*/pytest-\d+/[^/\s]+/", "", observed)  # the test's temporary directory
        self.rows.append((fault, " ".join(observed.split()), verdict))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="leave out the tests marked slow")
    parser.add_argument("--width", type=int, default=110, help="characters of 'what it did' shown per row")
    args = parser.parse_args()
    matrix = Matrix()
    selection = "fault and not slow" if args.quick else "fault"
    pytest.main([str(ROOT / "tests"), "-m", selection, "-q", "--tb=no", "-p", "no:cacheprovider"], plugins=[matrix])
    if not matrix.rows:
        print("no fault test ran", file=sys.stderr)
        return 1
    width = max(len(fault) for fault, _, _ in matrix.rows)
    print(f"\n{'fault':<{width}}  {'held?':<7}  what it did")
    for fault, observed, verdict in sorted(matrix.rows):
        shown = observed if len(observed) <= args.width else observed[: args.width - 3] + "..."
        print(f"{fault:<{width}}  {verdict:<7}  {shown}")
    broken = sum(verdict == "BROKEN" for _, _, verdict in matrix.rows)
    print(f"\n{len(matrix.rows)} faults: {len(matrix.rows) - broken} held, {broken} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
