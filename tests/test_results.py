"""Result files and the tables rendered from them (bench/render_results.py, dreamlip.results)."""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from dreamlip.results import commit, provenance, record_run

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "bench" / "render_results.py"
sys.path.insert(0, str(RENDER.parent))
import render_results  # noqa: E402


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_committed_tables_match_their_result_files():
    done = subprocess.run([sys.executable, str(RENDER), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # every table the docs show from data is one of these blocks, so each is checked above
    marked = [p for p in render_results.documents() if "<!-- rendered:" in p.read_text()]
    assert ROOT / "README.md" in marked


def test_every_measured_table_of_the_readme_and_results_is_rendered():
    """A table row with a measured figure (a decimal) outside a rendered block would be typed by hand."""
    typed = []
    for path in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        rendered = False
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith(("<!-- rendered:", "<!-- end rendered")):
                rendered = line.startswith("<!-- rendered:")
            elif line.startswith("|") and not rendered and re.search(r"\d\.\d", line):
                typed.append(f"{path.name}:{number}")
    assert not typed, typed


def _ablation_runs(values: dict[str, list[float]]) -> dict:
    metrics = [metric for _, metric in render_results.ABLATION_COLUMNS if "{}" not in metric]
    runs = {}
    for rung, per_seed in values.items():
        for seed, value in enumerate(per_seed):
            runs[f"{rung}/seed{seed}"] = {metric: value for metric in metrics} | {
                "segmentation/sclip/mIoU": value + 1, "segmentation/naclip/mIoU": value,
                "settings": {"steps": 400, "batch_size": 64, "k": 6, "n_train": 3000, "n_test": 300, "set": []},
                "provenance": {"command": f"python bench/ablation.py --variants {rung}", "commit": "abc", "machine": "m"},
            }
    return runs


def test_an_ablation_table_is_the_mean_and_sample_sd_of_its_seeds(tmp_path):
    (tmp_path / "runs.json").write_text(json.dumps(_ablation_runs({"clip": [1.0, 2.0, 3.0], "short": [10.0]})))
    text = "x\n<!-- rendered: ablation runs.json short clip -->\nstale\n<!-- end rendered -->\ny\n"
    rendered = render_results.render_file(text, tmp_path)
    assert rendered.startswith("x\n<!-- rendered: ablation runs.json short clip -->\n| rung |")
    assert rendered.endswith("<!-- end rendered -->\ny\n") and "stale" not in rendered
    rows = [line for line in rendered.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {render_results.RUNG_LABELS[r]}" for r in ("short", "clip")]
    clip = rows[1].split(" | ")
    assert clip[1] == "3" and clip[2] == "2.0 ± 1.0"  # mean and sample sd of 1, 2, 3
    assert clip[9] == "3.0 ± 1.0 (sclip)"  # the best dense read-out by mean, named
    assert rows[0].split(" | ")[2] == "10.0"  # one seed: no spread
    assert "`python bench/ablation.py --variants clip`; `python bench/ablation.py --variants short`" in rendered
    assert render_results.render_file(rendered, tmp_path) == rendered  # rendering is a fixed point


def test_a_rung_scored_by_conditioned_embeddings_shows_those_metrics_and_no_others(tmp_path):
    runs = _ablation_runs({"flair": [1.0, 3.0]})
    for seed, value in enumerate([20.0, 40.0]):
        runs[f"flair/seed{seed}"] |= {"retrieval/conditioned_image_to_text_R@1": value, "zeroshot/conditioned_top1": value + 1}
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    rendered = render_results.render_file("<!-- rendered: ablation runs.json flair flair:conditioned -->\n<!-- end rendered -->\n", tmp_path)
    label = render_results.RUNG_LABELS["flair"]
    plain, conditioned = [line.split(" | ") for line in rendered.splitlines() if line.startswith(f"| {label}")]
    columns = [label for label, _ in render_results.ABLATION_COLUMNS]
    assert plain[2 + columns.index("I→T R@1")] == "2.0 ± 1.4"
    assert conditioned[0] == f"| {label}, scored by text-conditioned embeddings"
    assert conditioned[2 + columns.index("I→T R@1")] == "30.0 ± 14.1"
    assert conditioned[2 + columns.index("zero-shot top-1")] == "31.0 ± 14.1"
    # no conditioned segmentation or text→image in the runs: empty, not the global figures
    assert conditioned[2 + columns.index("T→I R@1")] == "" and conditioned[2 + columns.index("seg raw")] == ""
    with pytest.raises(ValueError, match="the only scoring a rung takes is ':conditioned'"):
        render_results.render_file("<!-- rendered: ablation runs.json flair:pooled -->\n<!-- end rendered -->\n", tmp_path)


def test_the_comparison_shows_each_set_and_bolds_the_best_and_whoever_is_level_with_it(tmp_path):
    first = _ablation_runs({"clip": [10.0, 12.0, 14.0], "short": [13.0, 15.0, 17.0], "siglip": [20.0, 21.0, 22.0]})
    second = _ablation_runs({"clip": [30.0], "short": [5.0, 6.0, 7.0], "siglip": [31.0, 32.0, 33.0]})
    for runs, dataset in ((first, "synthetic"), (second, "real")):
        for entry in runs.values():
            entry["settings"]["dataset"] = dataset
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    rendered = render_results.render_file("<!-- rendered: comparison a.json,b.json clip short siglip -->\n<!-- end rendered -->\n", tmp_path)
    rows = [line.split(" | ") for line in rendered.splitlines() if line.startswith("| embedded") or line.startswith("| real-image")]
    assert [(row[0], row[2]) for row in rows] == [("| embedded", "3"), ("| embedded", "3"), ("| embedded", "3"),
                                                  ("| real-image", "1"), ("| real-image", "3"), ("| real-image", "3")]
    zero_shot = 3 + [label for label, _ in render_results.COMPARISON_COLUMNS].index("zero-shot top-1")
    # embedded: siglip 21 ± 1 is the best; short 15 ± 2 does not reach 20, so only siglip is bold
    assert [row[zero_shot] for row in rows[:3]] == ["12.0 ± 2.0", "15.0 ± 2.0", "**21.0 ± 1.0**"]
    # real: clip's one seed (30, no spread) falls short of siglip's 32 - 1
    assert [row[zero_shot] for row in rows[3:]] == ["30.0", "6.0 ± 1.0", "**32.0 ± 1.0**"]
    second["clip/seed0"]["zeroshot/top1"] = 31.0  # now level with siglip within its spread
    (tmp_path / "b.json").write_text(json.dumps(second))
    again = render_results.render_file(rendered, tmp_path)
    assert [line.split(" | ")[zero_shot] for line in again.splitlines() if line.startswith("| real-image")][0] == "**31.0**"
    with pytest.raises(ValueError, match="no result file c.json"):
        render_results.render_file("<!-- rendered: comparison a.json,c.json clip -->\n<!-- end rendered -->\n", tmp_path)


def test_the_comparison_gives_each_objectives_step_time_from_a_train_step_run(tmp_path):
    runs = _ablation_runs({"clip": [10.0], "dreamlip+ramp05": [12.0], "flair": [11.0], "cosmos": [9.0],
                           "flair+dreamlip": [8.0], "cosmos+dreamlip": [7.0]})
    runs["flair/seed0"]["retrieval/conditioned_image_to_text_R@1"] = 14.0
    for entry in runs.values():
        entry["settings"]["dataset"] = "synthetic"
    for combination in ("flair+dreamlip", "cosmos+dreamlip"):  # a variant's run with loss.objective set
        runs[f"{combination}/seed0"]["settings"]["set"] = [f"loss.objective={combination}"]
    (tmp_path / "a.json").write_text(json.dumps(runs))
    steps = {"Tiny/cpu": {"settings": {"model": "Tiny", "device": "cpu", "batch": 64},
                          "results": [{"name": "clip", "ratio_to_open_clip": 0.6}, {"name": "dreamlip", "ratio_to_open_clip": 1.25},
                                      {"name": "flair", "ratio_to_open_clip": 1.2}, {"name": "cosmos", "ratio_to_open_clip": 3.1},
                                      {"name": "flair+dreamlip", "ratio_to_open_clip": 1.3}],
                          "provenance": {"command": "python bench/train_step.py", "commit": "def", "machine": "m"}}}
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    text = ("<!-- rendered: comparison a.json clip dreamlip+ramp05 flair flair:conditioned cosmos flair+dreamlip cosmos+dreamlip "
            "steps=steps.json:Tiny/cpu -->\n<!-- end rendered -->\n")
    rendered = render_results.render_file(text, tmp_path)
    rows = [line.split(" | ") for line in rendered.splitlines() if line.startswith("| embedded")]
    assert rendered.splitlines()[1].endswith("| step time vs open_clip |")
    # a tagged rung costs its variant's step, a combination its own (cosmos+dreamlip is not cosmos's step);
    # conditioned scoring is the same step, not shown twice; no run, no cell
    assert [row[-1] for row in rows] == ["0.60x |", "1.25x |", "1.20x |", " |", "3.10x |", "1.30x |", " |"]
    assert "`python bench/train_step.py`" in rendered and "`def`" in rendered
    with pytest.raises(ValueError, match="no run 'Tiny/gpu'"):
        render_results.render_file(text.replace("Tiny/cpu", "Tiny/gpu"), tmp_path)


def test_the_larger_scale_comparison_names_its_objectives_plainly_and_its_tower_once(tmp_path):
    runs = _ablation_runs({"clip+small800": [10.0], "dreamlip+small800-default": [12.0], "cosmos+small800": [9.0]})
    for entry in runs.values():
        entry["settings"] |= {"dataset": "real", "steps": 800, "set": ["model.name=DreamLIP-ViT-Small-64"]}
    (tmp_path / "a.json").write_text(json.dumps(runs))
    text = "<!-- rendered: comparison a.json clip+small800 dreamlip+small800-default cosmos+small800 -->\n<!-- end rendered -->\n"
    rendered = render_results.render_file(text, tmp_path)
    labels = [line.split(" | ")[1] for line in rendered.splitlines() if line.startswith("| real-image")]
    assert labels == [render_results.OBJECTIVE_LABELS[r] for r in ("clip", "dreamlip+textlate", "cosmos")]
    assert "800 steps of 64, K = 6, the DreamLIP-ViT-Small-64 tower;" in rendered
    runs["clip+small800/seed0"]["settings"]["set"] = []  # the preset's tower beside the Small-64 runs
    (tmp_path / "a.json").write_text(json.dumps(runs))
    with pytest.raises(ValueError, match="differ in tower or recipe"):
        render_results.render_file(text, tmp_path)


def test_a_readouts_table_gives_each_read_out_with_background_and_objects_only(tmp_path):
    runs = _ablation_runs({"clip": [2.0, 4.0], "dreamlip": [7.0, 9.0]})
    for entry in runs.values():
        for readout in render_results.DENSE:
            entry[f"segmentation/{readout}/mIoU"] = entry["segmentation/mIoU"] + 1
            entry[f"segmentation/{readout}/objects/mIoU"] = entry["segmentation/objects/mIoU"] * 3
    runs["dreamlip/seed1"]["segmentation/naclip/objects/mIoU"] = 33.0
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    rendered = render_results.render_file("<!-- rendered: readouts runs.json clip dreamlip -->\n<!-- end rendered -->\n", tmp_path)
    rows = [line.split(" | ") for line in rendered.splitlines() if line.startswith("| ")]
    assert rows[0][2:] == ["raw", "maskclip", "sclip", "clearclip", "naclip |"]
    assert rows[1][1:4] == ["2", "3.0 ± 1.4 / 3.0 ± 1.4", "4.0 ± 1.4 / 9.0 ± 4.2"]
    assert rows[2][-1] == "9.0 ± 1.4 / 27.0 ± 8.5 |"  # naclip objects only: 21 and 33


def test_a_changed_result_makes_the_check_fail(tmp_path):
    (tmp_path / "runs.json").write_text(json.dumps(_ablation_runs({"clip": [1.0, 2.0, 3.0]})))
    rendered = render_results.render_file("<!-- rendered: ablation runs.json clip -->\n<!-- end rendered -->\n", tmp_path)
    runs = json.loads((tmp_path / "runs.json").read_text())
    runs["clip/seed2"]["zeroshot/top1"] = 6.0
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    again = render_results.render_file(rendered, tmp_path)
    assert again != rendered
    assert f"| {statistics.mean([1, 2, 6]):.1f} ± {statistics.stdev([1, 2, 6]):.1f} |" in again


def test_runs_of_one_rung_with_different_settings_are_refused(tmp_path):
    runs = _ablation_runs({"clip": [1.0, 2.0]})
    runs["clip/seed1"]["settings"]["steps"] = 800
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    with pytest.raises(ValueError, match="rung 'clip' were made with different settings"):
        render_results.render_file("<!-- rendered: ablation runs.json clip -->\n<!-- end rendered -->\n", tmp_path)
    with pytest.raises(ValueError, match="no result file missing.json"):
        render_results.render_file("<!-- rendered: demo missing.json -->\n<!-- end rendered -->\n", tmp_path)


def test_a_train_step_table_shows_each_recorded_step_in_order(tmp_path):
    row = {"step_ms": 400.0, "ratio_to_open_clip": 1.0, "ratio_iqr": [1.0, 1.0], "gflop": 20.0, "flop_ratio": 1.0,
           "time_over_flop_ratio": 1.0}
    runs = {"Tiny/cpu/batch64/k6": {
        "settings": {"model": "Tiny", "device": "cpu", "batch": 64, "k": 6, "threads": 2, "rounds": 10, "warmup": 2},
        "load_average_at_start": 0.25,
        "results": [{"name": "open_clip", "label": "open_clip CLIP"} | row,
                    {"name": "dreamlip", "label": "dreamlip"} | row | {"ratio_to_open_clip": 1.32, "ratio_iqr": [1.3, 1.35],
                                                                      "flop_ratio": 1.2, "time_over_flop_ratio": 1.1}],
        "provenance": {"command": "python bench/train_step.py", "commit": "abc", "machine": "m"}}}
    (tmp_path / "steps.json").write_text(json.dumps(runs))
    text = "<!-- rendered: train_step steps.json Tiny/cpu/batch64/k6 -->\n<!-- end rendered -->\n"
    rendered = render_results.render_file(text, tmp_path)
    rows = [line for line in rendered.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| step (Tiny, cpu, batch 64) |")
    assert rows[1:] == ["| open_clip CLIP | 1.00 (1.00-1.00) | 1.00 | 1.00 | 400 |",
                        "| dreamlip | 1.32 (1.30-1.35) | 1.20 | 1.10 | 400 |"]
    assert "Median of 10 interleaved rounds' ratios, 2 threads, load average 0.25" in rendered
    assert render_results.render_file(rendered, tmp_path) == rendered
    with pytest.raises(ValueError, match="no run 'Tiny/cpu/batch8/k6'"):
        render_results.render_file(text.replace("batch64", "batch8"), tmp_path)


def test_provenance_names_the_commit_and_marks_a_dirty_tree(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "--short=12", "HEAD")
    assert commit(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("not part of any commit")
    assert commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two")
    assert commit(tmp_path) == head + "+dirty"
    assert commit(tmp_path.parent / "not-a-checkout-anywhere") .startswith("dreamlip ")

    made = provenance(["/usr/bin/dreamlip", "demo", "--out", "a b"], program="dreamlip")
    assert made["command"] == "dreamlip demo --out 'a b'"
    assert made["machine"].startswith(f"{__import__('os').cpu_count()} CPU cores")


def test_record_run_keeps_the_runs_of_concurrent_writers(tmp_path):
    path = tmp_path / "results.json"
    code = "import sys; from dreamlip.results import record_run\nfor i in range(20): record_run(sys.argv[1], f'{sys.argv[2]}/{i}', {'v': i})"
    writers = [subprocess.Popen([sys.executable, "-c", code, str(path), name]) for name in ("a", "b")]
    assert [w.wait() for w in writers] == [0, 0]
    runs = record_run(path, "a/0", {"w": 1})
    assert sorted(runs) == sorted(f"{name}/{i}" for name in ("a", "b") for i in range(20))
    assert runs["a/0"] == {"v": 0, "w": 1}  # merged, not replaced


def test_a_demo_table_shows_every_model_in_the_order_the_demo_ran_them(tmp_path):
    """A `dreamlip demo --models clip,siglip,dreamlip` record (keys sorted in the file): a column each
    in settings' order, the best bold in each row, the trainings' times in that order."""
    (entry,) = json.loads((ROOT / "bench" / "results" / "demo.json").read_text()).values()
    entry["models"]["siglip"] = dict(entry["models"]["clip"], **{"zeroshot/top1": 99.0})
    entry["segmentation"]["siglip"] = entry["segmentation"]["clip"]
    entry["settings"]["models"] = ["clip", "siglip", "dreamlip"]
    entry["timings"]["train_siglip_s"] = 1.0
    (tmp_path / "demo.json").write_text(json.dumps({"models=clip,siglip,dreamlip": entry}, sort_keys=True))
    rendered = render_results.render_file("<!-- rendered: demo demo.json -->\n<!-- end rendered -->\n", tmp_path)
    rows = [line for line in rendered.splitlines() if line.startswith("| ")]
    assert rows[0] == "| metric (%) | CLIP | siglip | DreamLIP | baseline |"
    zero_shot = next(row for row in rows if row.startswith("| zero-shot classification top-1 |")).split(" | ")
    assert zero_shot[1:4] == [f"{entry['models']['clip']['zeroshot/top1']:.1f}", "**99.0**", f"{entry['models']['dreamlip']['zeroshot/top1']:.1f}"]
    trainings = re.findall(r"train_(\w+?) \d+ s", rendered)
    assert trainings == ["clip", "siglip", "dreamlip"]
