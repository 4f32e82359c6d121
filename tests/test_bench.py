"""The bench scripts: every script run at a tiny setting, the ablation bench's tables, and the fault
matrix's report of each fault test's observation and outcome."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ablation = _module("ablation")


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
    matrix = _module("fault_matrix").Matrix()
    pytest.main([str(tmp_path), "-q", "-p", "no:cacheprovider", "-o", "markers=fault(name): x"], plugins=[matrix])
    assert sorted(matrix.rows) == [
        ("broken fault", "AssertionError: it printed a traceback", "BROKEN"),
        ("held fault", "rc 2: one line in run", "held"),
        ("unrunnable fault", "Skipped: no tmpfs here", "not run"),
    ]


# Every bench/ script, run as its README command runs it (a fresh `python bench/X.py` process, so an
# import that needs ensure_torchvision first shows), at a setting small enough for the suite.
BENCH = Path(__file__).parents[1] / "bench"
NANO = "DreamLIP-ViT-Nano-32"


def _bench(script: str, *argv, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *map(str, argv)], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, f"{script}: {done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def ablation_run(tmp_path_factory):
    """One rung, one seed, one step of the ablation bench: its runs.json, table and checkpoint."""
    out = tmp_path_factory.mktemp("ablation")
    stdout = _bench("ablation.py", "--out", out, "--seeds", 0, "--steps", 1, "--batch-size", 8, "--k", 2,
                    "--n-train", 40, "--n-test", 8, "--variants", "clip", "--set", f"model.name={NANO}",
                    "--tag", "nano", "--record", out / "record.json", cwd=out)
    return out, stdout


@pytest.mark.slow
def test_every_bench_script_has_a_test():
    tested = {"ablation.py", "attribute_probe.py", "demo_data.py", "long_context.py", "search_latency.py",
              "seg_readouts.py", "subcaption_ambiguity.py", "supervised_bound.py", "train_step.py",
              "loader.py", "step_cost.py", "prepare.py", "zeroshot_breakdown.py",
              "fault_matrix.py", "render_results.py"}  # the last two: above and tests/test_results.py
    assert {path.name for path in BENCH.glob("*.py")} == tested


@pytest.mark.slow
def test_ablation_bench_tabulates_every_metric(ablation_run):
    out, stdout = ablation_run
    runs = json.loads((out / "runs.json").read_text())
    table = json.loads((out / "ablation-nano.json").read_text())["table"]
    assert list(runs) == ["clip+nano/seed0"] and list(table) == ["clip+nano"]
    recorded = json.loads((out / "record.json").read_text())["clip+nano/seed0"]
    assert {k: v for k, v in recorded.items() if k != "settings"} == runs["clip+nano/seed0"]
    assert recorded["settings"] == {"dataset": "synthetic", "steps": 1, "batch_size": 8, "k": 2, "n_train": 40,
                                    "n_test": 8, "set": [f"model.name={NANO}"]}
    assert recorded["provenance"]["command"].startswith(f"python bench/ablation.py --out {out}")
    for metric, _ in ablation.METRICS:
        assert table["clip+nano"][metric] == {"mean": runs["clip+nano/seed0"][metric], "std": 0.0,
                                              "values": [runs["clip+nano/seed0"][metric]]}
    assert (out / "runs" / "clip+nano" / "seed0" / "model.pt").is_file() and "clip+nano" in stdout


@pytest.mark.slow
def test_ablation_bench_evaluates_again_only_the_tasks_of_missing_metrics(ablation_run, tmp_path):
    """A metric new to METRICS re-scores a trained run's checkpoint with that metric's task alone:
    the run is not trained again and the other tasks' figures stay as they were."""
    out, _ = ablation_run
    shutil.copytree(out, tmp_path / "out")
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    entry = runs["clip+nano/seed0"]
    probe = entry.pop("linear_probe/top1")
    entry["zeroshot/top1"] = -1.0  # a figure no evaluation gives: it must survive
    (tmp_path / "out" / "runs.json").write_text(json.dumps(runs))
    model = tmp_path / "out" / "runs" / "clip+nano" / "seed0" / "model.pt"
    trained = model.stat().st_mtime_ns
    _bench("ablation.py", "--out", tmp_path / "out", "--seeds", 0, "--steps", 1, "--batch-size", 8, "--k", 2,
           "--n-train", 40, "--n-test", 8, "--variants", "clip", "--set", f"model.name={NANO}", "--tag", "nano", cwd=tmp_path)
    again = json.loads((tmp_path / "out" / "runs.json").read_text())["clip+nano/seed0"]
    assert again["linear_probe/top1"] == probe and again["zeroshot/top1"] == -1.0
    assert "eval_provenance" in again and model.stat().st_mtime_ns == trained


@pytest.mark.slow
def test_ablation_scores_an_objective_with_a_pooler_its_own_way_too(ablation_run, tmp_path):
    """FLAIR's checkpoint is also scored by text-conditioned embeddings; CLIP's has nothing to add."""
    _bench("ablation.py", "--out", tmp_path, "--seeds", 0, "--steps", 1, "--batch-size", 8, "--k", 2, "--n-train", 40,
           "--n-test", 8, "--variants", "flair", "--set", f"model.name={NANO}", "--tag", "nano", cwd=tmp_path)
    flair = json.loads((tmp_path / "runs.json").read_text())["flair+nano/seed0"]
    clip = json.loads((ablation_run[0] / "runs.json").read_text())["clip+nano/seed0"]
    for metric in ("retrieval/conditioned_image_to_text_R@1", "retrieval/conditioned_text_to_image_R@1",
                   "zeroshot/conditioned_top1"):
        assert metric in flair and metric not in clip


@pytest.mark.slow
def test_checkpoint_benches_read_the_ablation_checkpoint(ablation_run, tmp_path):
    out, _ = ablation_run
    checkpoint = out / "runs" / "clip+nano" / "seed0" / "model.pt"
    _bench("attribute_probe.py", "--data", out / "data", "--checkpoints", f"clip={checkpoint}",
           "--out", tmp_path / "probes.json", cwd=tmp_path)
    probes = json.loads((tmp_path / "probes.json").read_text())["clip"]
    assert set(probes) == {"shape", "color", "size", "position", "texture", "shape_present"}
    assert all(0 <= probe["accuracy"] <= 100 for probe in probes.values())
    _bench("seg_readouts.py", "--data", out / "data", "--checkpoints", f"clip={checkpoint}",
           "--out", tmp_path / "seg.json", cwd=tmp_path)
    table = json.loads((tmp_path / "seg.json").read_text())["mIoU"]["clip"]
    assert list(table) == ["raw", "maskclip", "sclip", "clearclip", "naclip"]


def test_zeroshot_breakdown_splits_hits_by_scene_and_errors_by_what_they_name():
    zeroshot_breakdown = _module("zeroshot_breakdown")
    classes = ["cat", "coin", "horse"]
    records = [
        {"objects": [{"category": "cat", "size": "large"}]},                                    # right
        {"objects": [{"category": "cat", "size": "small"}, {"category": "coin", "size": "large"}]},  # coin: present
        {"objects": [{"category": "horse", "size": "large"}, {"category": "cat", "size": "small"}]},  # coin: absent
    ]
    table = zeroshot_breakdown.breakdown([0, 1, 1], [0, 0, 2], records, classes)
    assert table["all"] == {"top1": 100 / 3, "n": 3.0}
    assert table["objects=1"] == {"top1": 100.0, "n": 1.0} and table["objects=2"] == {"top1": 0.0, "n": 2.0}
    assert table["size=large"] == {"top1": 50.0, "n": 2.0} and table["size=small"] == {"top1": 0.0, "n": 1.0}
    assert table["wrong: names an object present"] == {"top1": 50.0, "n": 2.0}


@pytest.mark.slow
def test_zeroshot_breakdown_of_a_checkpoint_totals_its_zero_shot_score(ablation_run, tmp_path):
    out, _ = ablation_run
    _bench("zeroshot_breakdown.py", "--data", out / "data", "--checkpoints",
           f"clip={out / 'runs' / 'clip+nano' / 'seed0' / 'model.pt'}", "--out", tmp_path / "zs.json", cwd=tmp_path)
    table = json.loads((tmp_path / "zs.json").read_text())["clip"]
    run = json.loads((out / "runs.json").read_text())["clip+nano/seed0"]
    assert table["all"]["top1"] == pytest.approx(run["zeroshot/top1"])  # as dreamlip eval scores it
    assert sum(cell["n"] for group, cell in table.items() if group.startswith("objects=")) == run["zeroshot/n_images"]


@pytest.mark.slow
def test_train_step_bench_times_every_objective_against_open_clip_and_records_it(tmp_path):
    _bench("train_step.py", "--model", NANO, "--batch", 8, "--k", 2, "--steps", 2, "--warmup", 0,
           "--json", tmp_path / "steps.json", "--record", tmp_path / "record.json", cwd=tmp_path)
    results = json.loads((tmp_path / "steps.json").read_text())["results"]
    assert list(results) == ["open_clip", "clip", "short", "dreamlip", "dreamlip-unpacked", "dreamlip-unbucketed",
                             "siglip", "flair", "flair+dreamlip", "cosmos", "cosmos+dreamlip"]
    assert results["open_clip"]["ratio_to_open_clip"] == 1.0 and results["open_clip"]["flop_ratio"] == 1.0
    gflop = [results[name]["gflop"] for name in ("clip", "short", "dreamlip")]
    assert 0 < gflop[0] < gflop[1] < gflop[2]  # more texts, then the grouping term
    assert results["dreamlip-unbucketed"]["gflop"] > results["dreamlip"]["gflop"]  # every text at the longest's length
    assert results["dreamlip-unpacked"]["gflop"] == results["dreamlip"]["gflop"]  # the same products, laid out otherwise
    assert results["flair+dreamlip"]["gflop"] > results["flair"]["gflop"]  # plus the grouping term
    assert results["cosmos+dreamlip"]["gflop"] > results["cosmos"]["gflop"]
    # COSMOS runs its variant's 8 text crops and 2 + 6 image crops, whatever --k says
    assert results["cosmos"]["label"] == "cosmos: 2 + 6 crops, 8 text crops, EMA teacher"
    for row in results.values():
        assert row["flop_ratio"] == pytest.approx(row["gflop"] / results["open_clip"]["gflop"])
        assert row["time_over_flop_ratio"] == pytest.approx(row["ratio_to_open_clip"] / row["flop_ratio"])
        assert row["ratio_iqr"][0] <= row["ratio_to_open_clip"] <= row["ratio_iqr"][1]
    recorded = json.loads((tmp_path / "record.json").read_text())[f"{NANO}/cpu/batch8/k2"]
    assert [row.pop("name") for row in recorded["results"]] == list(results)
    assert recorded["results"] == list(results.values())
    assert recorded["settings"] | {"threads": 0} == {"model": NANO, "batch": 8, "k": 2, "device": "cpu", "threads": 0,
                                                     "rounds": 2, "warmup": 0}
    assert recorded["provenance"]["command"].startswith(f"python bench/train_step.py --model {NANO}")


@pytest.mark.slow
def test_speed_benches_run_at_a_small_setting(data_dir, tmp_path):
    _bench("long_context.py", "--model", NANO, "--batch", 2, "--k", 2, "--long", 96, "--steps", 1, "--warmup", 0,
           "--json", tmp_path / "long.json", cwd=tmp_path)
    assert set(json.loads((tmp_path / "long.json").read_text())["results"]) == {
        "dreamlip, context 77", "dreamlip, context 96", "open_clip encode_text, context 77", "open_clip encode_text, context 96"}
    _bench("seg_readouts.py", "--model", NANO, "--size", 32, "--images", 1, "--classes", 3, "--rounds", 1,
           "--out", tmp_path / "seg.json", cwd=tmp_path)
    speed = json.loads((tmp_path / "seg.json").read_text())["speed"]
    assert speed["raw"]["time_ratio_to_raw"] == 1.0 and set(speed) == {"raw", "maskclip", "sclip", "clearclip", "naclip", "all"}
    # search_latency exits non-zero if an index returns other ids than the brute-force baseline
    summary = json.loads(_bench("search_latency.py", "--n", 500, "--dim", 16, "--queries", 5, "--warmup", 1, cwd=tmp_path).splitlines()[-1])
    assert summary["n"] == 500 and "ExactIndex, memory-mapped" in summary["results"]
    assert _bench("demo_data.py", "--n", 10, "--image-size", 32, cwd=tmp_path).startswith("10 synthetic images of 32 px")


@pytest.mark.slow
def test_dataset_benches_read_a_demo_data_directory(data_dir, tmp_path):
    table = _bench("subcaption_ambiguity.py", "--data", data_dir, "--batch", 8, "--draws", 20, cwd=tmp_path)
    assert table.startswith("64 training images, batch 8") and len(table.splitlines()) == 5
    _bench("supervised_bound.py", "--data", data_dir, "--model", NANO, "--steps", 2, "--batch-size", 4, "--warmup", 1,
           "--out", tmp_path / "curve.json", cwd=tmp_path)
    assert [point["step"] for point in json.loads((tmp_path / "curve.json").read_text())["curve"]] == [1, 2]


@pytest.mark.slow
def test_scale_benches_run_at_a_small_setting(tmp_path):
    _bench("step_cost.py", "--model", NANO, "--k", 2, "--text-tokens", 8, "--json", tmp_path / "cost.json", cwd=tmp_path)
    _bench("step_cost.py", "--model", NANO, "--k", 0, "--text-tokens", 8, "--json", tmp_path / "clip.json", cwd=tmp_path)
    cost, clip = (json.loads((tmp_path / name).read_text())["results"] for name in ("cost.json", "clip.json"))
    assert cost["parameters_m"] == clip["parameters_m"]  # the same model; more texts and grouping cost more
    assert cost["gflop_per_sample"] > clip["gflop_per_sample"] and cost["est_memory_gib"] > clip["est_memory_gib"]
    _bench("loader.py", "--samples", 16, "--batch", 8, "--k", 2, "--model", NANO, "--rounds", 1,
           "--json", tmp_path / "loader.json", cwd=tmp_path)
    loader = json.loads((tmp_path / "loader.json").read_text())
    assert {"open_clip_train (1 caption)", "dreamlip, prepared shards (K=2, pre-split)"} <= set(loader["samples_per_s"])
    assert loader["presplit_over_split"] == loader["samples_per_s"]["dreamlip, prepared shards (K=2, pre-split)"] / \
        loader["samples_per_s"]["dreamlip, img2dataset shards (K=2, split per load)"]
    _bench("prepare.py", "--samples", 32, "--rounds", 1, "--json", tmp_path / "prepare.json", cwd=tmp_path)
    prepared = json.loads((tmp_path / "prepare.json").read_text())
    assert set(prepared["rows_per_second"]) == {"1", "2"} and all(v > 0 for v in prepared["rows_per_second"].values())
    assert prepared["ratio"] == prepared["rows_per_second"]["2"] / prepared["rows_per_second"]["1"]


@pytest.mark.slow
def test_ablation_bench_runs_the_ladder_on_the_real_image_set(tmp_path):
    _bench("ablation.py", "--out", tmp_path, "--dataset", "real", "--seeds", 0, "--steps", 1, "--batch-size", 8, "--k", 2,
           "--n-train", 24, "--n-test", 8, "--variants", "dreamlip", "--set", f"model.name={NANO}", "--tag", "nano",
           "--record", tmp_path / "record.json", cwd=tmp_path)
    classes = json.loads((tmp_path / "data" / "classes.json").read_text())
    assert "cat" in classes["classification"]["names"]  # the real-image set's categories, not the shapes
    recorded = json.loads((tmp_path / "record.json").read_text())["dreamlip+nano/seed0"]
    assert recorded["settings"]["dataset"] == "real"
    assert all(metric in recorded for metric, _ in ablation.METRICS)
