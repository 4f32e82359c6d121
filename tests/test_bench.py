"""The ablation bench's bookkeeping: invocations sharing an --out keep each other's runs."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location("ablation", Path(__file__).parents[1] / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ablation)


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
