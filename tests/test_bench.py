"""The benches' bookkeeping: ablation invocations sharing an --out keep each other's runs; the
fault matrix reports each fault test's observation and outcome."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
from pathlib import Path

import pytest


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _bench("ablation")


def _record_many(results: str, prefix: str) -> None:
    for i in range(20):
        ablation.record_run(Path(results), f"{prefix}/seed{i}", {"metric": i})


def test_record_run_merges_metrics_into_the_run_already_there(tmp_path):
    results = tmp_path / "runs.json"
    ablation.record_run(results, "clip/seed0", {"a": 1.0, "train_seconds": 9.0})
    ablation.record_run(results, "short/seed0", {"a": 2.0})
    runs = ablation.record_run(results, "clip/seed0", {"b": 3.0})  # a metric added on re-evaluation
    assert runs == json.loads(results.read_text())
    assert runs == {"clip/seed0": {"a": 1.0, "train_seconds": 9.0, "b": 3.0}, "short/seed0": {"a": 2.0}}


def test_concurrent_invocations_lose_no_run(tmp_path):
    results = tmp_path / "runs.json"
    with mp.get_context("fork").Pool(2) as pool:
        pool.starmap(_record_many, [(str(results), "clip"), (str(results), "dreamlip")])
    runs = json.loads(results.read_text())
    assert runs == {f"{p}/seed{i}": {"metric": i} for p in ("clip", "dreamlip") for i in range(20)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".runs.json")] == []  # no partial write left


_FAULT_TESTS = """
import pytest

@pytest.mark.fault("held fault")
def test_held(record_property):
    record_property("observed", "rc 2: one line in /tmp/pytest-of-x/pytest-7/test_held0/run")

@pytest.mark.fault("broken fault")
def test_broken():
    assert 1 == 2, "it printed a traceback"

@pytest.mark.fault("unrunnable fault")
def test_skipped():
    pytest.skip("no tmpfs here")

def test_not_a_fault():
    pass
"""


def test_fault_matrix_reports_each_fault_tests_observation_and_outcome(tmp_path):
    (tmp_path / "test_faults.py").write_text(_FAULT_TESTS)
    matrix = _bench("fault_matrix").Matrix()
    pytest.main([str(tmp_path), "-q", "-p", "no:cacheprovider", "-o", "markers=fault(name): x"], plugins=[matrix])
    assert sorted(matrix.rows) == [
        ("broken fault", "AssertionError: it printed a traceback", "BROKEN"),
        ("held fault", "rc 2: one line in run", "held"),
        ("unrunnable fault", "Skipped: no tmpfs here", "not run"),
    ]
