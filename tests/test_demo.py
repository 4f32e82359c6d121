"""`dreamlip demo` end to end at a small setting, on the base install (no extras, see base_install.py):
results.json (metrics, dense read-outs, baselines, phase times), learning curves in metrics.jsonl
and a report with tables and figures."""

import base64
import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_cli
from dreamlip.config import LossConfig
from dreamlip.report import HEADLINE_METRICS

BASE_INSTALL = Path(__file__).with_name("base_install.py")
READOUTS = ("raw", "maskclip", "sclip", "clearclip", "naclip")
PHASES = ("data_s", "train_clip_s", "train_eval_clip_s", "train_dreamlip_s", "train_eval_dreamlip_s", "eval_s", "report_s", "total_s")


def _background_everywhere(data: Path) -> tuple[float, float]:
    """mIoU and pixel accuracy of predicting background at every pixel, by counting mask pixels:
    background's IoU is its share of the pixels, every other class present scores 0."""
    classes = json.loads((data / "classes.json").read_text())["segmentation"]
    background, ignore = classes["names"].index("background"), classes.get("ignore_index", 255)
    background_pixels = valid_pixels = 0
    present = set()
    for line in (data / "test.jsonl").read_text().splitlines():
        mask = np.asarray(Image.open(data / json.loads(line)["mask"]))
        for value in mask.flatten().tolist():
            if value != ignore:
                valid_pixels += 1
                background_pixels += value == background
                present.add(value)
    share = background_pixels / valid_pixels
    return 100 * share / len(present | {background}), 100 * share


def _commonest_shape_everywhere(data: Path) -> tuple[str, float]:
    """The commonest shape and its objects-only mIoU when predicted on every shape pixel: that
    shape's IoU is its share of the shape pixels, every other shape present scores 0."""
    classes = json.loads((data / "classes.json").read_text())["segmentation"]
    names, ignore = classes["names"], classes.get("ignore_index", 255)
    counts = {}
    for line in (data / "test.jsonl").read_text().splitlines():
        for value in np.asarray(Image.open(data / json.loads(line)["mask"])).flatten().tolist():
            if value not in (ignore, names.index("background")):
                counts[value] = counts.get(value, 0) + 1
    commonest = max(counts, key=counts.get)
    return names[commonest], 100 * counts[commonest] / sum(counts.values()) / len(counts)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, str(BASE_INSTALL), "-m", "dreamlip.cli", "demo", "--out", str(out), "--n-train", "160",
         "--n-test", "24", "--steps", "6", "--batch-size", "32", "--k", "3", "--long-mode", "sentences+whole", "--heatmap-images", "2", "--eval-every", "4",
         "--record", str(tmp_path / "record.json")],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in ("1/4", "2/4", "3/4", "4/4"):
        assert f"== {stage}" in done.stdout  # progress is visible throughout
    assert f"dreamlip serve --checkpoint {out / 'runs' / 'dreamlip' / 'model.pt'} --compare {out / 'runs' / 'clip' / 'model.pt'}" in done.stdout

    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"clip", "dreamlip"}
    (key, recorded), = json.loads((tmp_path / "record.json").read_text()).items()
    assert key == "n_train=160,n_test=24,steps=6,batch_size=32,k=3,long_mode=sentences+whole,heatmap_images=2,eval_every=4"
    assert {k: v for k, v in recorded.items() if k != "provenance"} == results
    assert recorded["provenance"]["command"].startswith(f"dreamlip demo --out {out} --n-train 160")
    # The reported numbers are the saved models': `dreamlip eval` on each model.pt gives them again.
    for name, metrics in results["models"].items():
        evaluated = tmp_path / f"{name}.json"
        assert run_cli("eval", "--checkpoint", out / "runs" / name / "model.pt", "--data", out / "data",
                       "--tasks", "retrieval,zeroshot", "--workers", "0", "--quiet", "--out", evaluated) == 0
        again = json.loads(evaluated.read_text())["metrics"]
        for key in ("retrieval/image_to_text_R@1", "retrieval/text_to_image_R@1", "zeroshot/top1"):
            assert metrics[key] == pytest.approx(again[key]), (name, key)
    assert results["training"]["clip"]["steps"] == results["training"]["dreamlip"]["steps"] == 6
    # the recipes trained: CLIP on the raw caption alone, DreamLIP on --k sub-captions of whole long
    # captions (--long-mode) and the library's grouping default
    configs = {name: yaml.safe_load((out / "runs" / name / "config.yaml").read_text()) for name in ("clip", "dreamlip")}
    assert (configs["clip"]["captions"]["k"], configs["clip"]["loss"]["group_weight"]) == (0, 0.0)
    assert (configs["dreamlip"]["captions"]["k"], configs["dreamlip"]["captions"]["long_mode"]) == (3, "sentences+whole")
    assert configs["dreamlip"]["loss"] == dataclasses.asdict(LossConfig())

    # phase times: every phase, printed as it ends and in the summary, and they add up
    timings = results["timings"]
    assert list(timings) == list(PHASES)
    for key in PHASES:
        assert f"   {key}: " in done.stdout or key == "total_s"
        assert re.search(rf"^{key.removesuffix('_s')} +[0-9.]+$", done.stdout, re.M), key
    for variant in ("clip", "dreamlip"):
        assert 0 < timings[f"train_eval_{variant}_s"] < timings[f"train_{variant}_s"]
    parts = sum(timings[k] for k in ("data_s", "train_clip_s", "train_dreamlip_s", "eval_s", "report_s"))
    assert parts <= timings["total_s"] < parts + 5

    # no-knowledge baselines, recomputed here from the mask PNGs and the class list
    mIoU, pixel_acc = _background_everywhere(out / "data")
    background = results["baselines"]["background_everywhere"]
    assert abs(background["segmentation/mIoU"] - mIoU) < 1e-6 and abs(background["segmentation/pixel_acc"] - pixel_acc) < 1e-6
    shape, objects_mIoU = _commonest_shape_everywhere(out / "data")
    commonest = results["baselines"]["commonest_shape_everywhere"]
    assert commonest["shape"] == shape and commonest["segmentation/objects/mIoU"] == pytest.approx(objects_mIoU)
    n_classes = len(json.loads((out / "data" / "classes.json").read_text())["classification"]["names"])
    assert results["baselines"]["chance"] == {"zeroshot/top1": 100 / n_classes, "linear_probe/top1": 100 / n_classes}

    # segmentation: raw under the old keys, every dense read-out, the best one named
    for variant, metrics in results["models"].items():
        dense = {r: metrics[f"segmentation/{r}/mIoU"] for r in READOUTS[1:]}
        best = max(dense, key=dense.get)
        calibrated = {r: metrics[f"segmentation/{r}/calibrated/mIoU"] for r in READOUTS[1:]}
        best_calibrated = max(calibrated, key=calibrated.get)
        assert results["segmentation"][variant] == {
            "raw_mIoU": metrics["segmentation/mIoU"], "best_dense": best, "best_dense_mIoU": dense[best],
            "best_dense_pixel_acc": metrics[f"segmentation/{best}/pixel_acc"],
            "best_dense_objects_mIoU": metrics[f"segmentation/{best}/objects/mIoU"],
            "best_dense_calibrated": best_calibrated, "best_dense_calibrated_mIoU": calibrated[best_calibrated],
            "best_dense_calibrated_threshold": metrics[f"segmentation/{best_calibrated}/calibrated/threshold"],
        }
        # objects only: background never predicted, so never in the per-class IoUs
        assert "segmentation/objects/mIoU" in metrics and "segmentation/objects/IoU/background" not in metrics

    # learning curves of the held-out metrics: every 4 steps and at the last
    for variant in ("clip", "dreamlip"):
        records = [json.loads(line) for line in (out / "runs" / variant / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if "eval/zeroshot/top1" in r]
        assert [r["step"] for r in evals] == [4, 6]
        for record in evals:
            assert {"eval/retrieval/image_to_text_R@1", "eval/segmentation/mIoU"} <= record.keys()
        assert sum(r["eval_seconds"] for r in evals) == timings[f"train_eval_{variant}_s"]

    page = (out / "report.html").read_text()
    table = re.search(r'<table id="results">(.*?)</table>', page, re.S).group(1)
    headline = re.findall(r"<tr><th>([^<]+)</th><td>", table)
    assert headline == [key for key in HEADLINE_METRICS if key in results["models"]["clip"]]
    folded = re.search(r'<details>.*?<table id="all-metrics">(.*?)</table>\s*</details>', page, re.S).group(1)
    assert "<th>linear_probe/n_train</th>" in folded and "<th>retrieval/image_to_text_R@1</th>" not in folded
    readouts = re.search(r'<table id="readouts">(.*?)</table>', page, re.S).group(1)
    assert all(f"<th>{r}</th>" in readouts for r in READOUTS)
    assert readouts.count("<tr>") == len(READOUTS) + 1  # a row per read-out, none for the objects-only keys
    assert "<th>segmentation/objects/mIoU</th>" in table and "<th>segmentation/calibrated/mIoU</th>" in table
    assert readouts.count("calibrated mIoU</th>") == 2  # a column per model
    assert results["settings"]["seg_calibrate"] == {"split": "train", "images": 100}
    assert "chosen per model and read-out on the first 100\ntrain images' masks" in page
    assert "<th>baseline</th>" in table
    for image_id in ("loss-curves", "eval-curves", "grouping-heatmaps", "segmentation-maps"):
        encoded = re.search(rf'id="{image_id}"[^>]*src="data:image/png;base64,([^"]+)"', page).group(1)
        picture = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert picture.width > 200 and picture.height > 100
        assert len(np.unique(np.asarray(picture.convert("L")))) > 10, f"{image_id} is blank"


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 399, 400, 401])
def test_default_train_time_evals_are_three_spread_out_ending_at_the_last_step(steps):
    from dreamlip.demo import DemoSettings, _eval_every

    every = _eval_every(DemoSettings(steps=steps))
    # the trainer's rule (train.py): every `every` steps and at the final one
    evaluated = [step for step in range(1, steps + 1) if step % every == 0 or step == steps]
    assert len(evaluated) == min(3, steps)
    assert evaluated[-1] == steps
    assert all(later - earlier >= steps // 4 for earlier, later in zip(evaluated, evaluated[1:]))  # none back to back


@pytest.mark.slow
@pytest.mark.distributed
def test_demo_training_on_two_ranks_is_the_one_process_run(tmp_path):
    """--ranks 2: two spawned gloo processes, half the batch each, the grouping negatives gathered:
    the same losses and weights as one process, and the main rank's train-time evals."""
    import torch

    from dreamlip.demo import DemoSettings, _train_run
    from dreamlip.synthetic import generate

    data = tmp_path / "data"
    generate(data, n_train=48, n_test=16, seed=0)
    records, weights = {}, {}
    for ranks in (1, 2):
        run_dir = tmp_path / f"ranks{ranks}"
        summary = _train_run("dreamlip", data, run_dir, DemoSettings(steps=3, batch_size=16, k=3, eval_every=2, ranks=ranks))
        assert summary["steps"] == 3
        records[ranks] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        weights[ranks] = torch.load(run_dir / "model.pt", weights_only=True)["model"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (config["optim"]["batch_size"], config["loss"]["group_gather"], config["loss"]["local_loss"]) == (
            (16, False, False) if ranks == 1 else (8, True, True)
        )
    losses = {ranks: [(r["step"], r["loss"]) for r in rows if "loss" in r] for ranks, rows in records.items()}
    assert [step for step, _ in losses[2]] == [step for step, _ in losses[1]] and losses[1][-1][0] == 3
    assert [loss for _, loss in losses[2]] == pytest.approx([loss for _, loss in losses[1]], rel=1e-5)
    assert [r["step"] for r in records[2] if "eval_seconds" in r] == [2, 3]
    for name, tensor in weights[1].items():
        torch.testing.assert_close(weights[2][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_demo_ranks_must_divide_the_batch(tmp_path):
    from dreamlip.demo import DemoSettings, run_demo

    for ranks in (0, 3):
        with pytest.raises(ValueError, match=f"ranks must be at least 1 and divide the batch size 64, got {ranks}"):
            run_demo(tmp_path / "out", DemoSettings(ranks=ranks))
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow
def test_demo_trains_and_reports_the_models_it_is_given(tmp_path, capsys):
    """--models clip,siglip,dreamlip: each trained on the same data, seed and steps, each evaluated,
    with its curves, and each in the report's tables and figures in the order given, every later
    model compared with the first."""
    from dreamlip.cli import main

    out, models = tmp_path / "demo", ["clip", "siglip", "dreamlip"]
    assert main(["demo", "--out", str(out), "--n-train", "120", "--n-test", "16", "--steps", "4", "--batch-size", "16",
                 "--k", "2", "--heatmap-images", "1", "--eval-every", "2", "--models", ",".join(models)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["models"]) == list(results["segmentation"]) == list(results["training"]) == models
    assert results["settings"]["models"] == models
    assert list(results["timings"]) == ["data_s"] + [f"train{part}_{name}_s" for name in models for part in ("", "_eval")] + [
        "eval_s", "report_s", "total_s"]
    configs = {name: yaml.safe_load((out / "runs" / name / "config.yaml").read_text()) for name in models}
    assert {name: c["loss"]["objective"] for name, c in configs.items()} == {"clip": "dreamlip", "siglip": "siglip", "dreamlip": "dreamlip"}
    assert len({(c["run"]["seed"], c["optim"]["max_steps"], c["data"]["train"]) for c in configs.values()}) == 1
    for name in models:
        assert results["training"][name]["steps"] == 4
        assert set(HEADLINE_METRICS) <= results["models"][name].keys()
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "eval/zeroshot/top1" in r] == [2, 4]  # its learning curve
    siglip = [json.loads(line) for line in (out / "runs" / "siglip" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/sigmoid" in r for r in siglip)  # trained with its own objective, drawn in the loss figure

    # printed: a column per model, and the serve hint comparing the last with the first
    assert re.search(r"^metric +clip +siglip +dreamlip +baseline$", printed, re.M)
    assert (f"browse dreamlip beside clip: dreamlip serve --checkpoint {out / 'runs' / 'dreamlip' / 'model.pt'} "
            f"--compare {out / 'runs' / 'clip' / 'model.pt'}") in printed

    page = (out / "report.html").read_text()
    assert "<h1>dreamlip demo: plain CLIP vs SigLIP vs DreamLIP</h1>" in page
    table = re.search(r'<table id="results">(.*?)</table>', page, re.S).group(1)
    assert "<th>metric</th><th>clip</th><th>siglip</th><th>dreamlip</th><th>siglip − clip</th><th>dreamlip − clip</th><th>baseline</th>" in table
    row = re.search(r"<tr><th>zeroshot/top1</th>(.*?)</tr>", table).group(1)
    cells = [float(cell) for cell in re.findall(r"<td[^>]*>([-+0-9.]+)</td>", row)]
    top1 = [results["models"][name]["zeroshot/top1"] for name in models]
    assert cells == pytest.approx([*top1, top1[1] - top1[0], top1[2] - top1[0], results["baselines"]["chance"]["zeroshot/top1"]], abs=0.006)
    readouts = re.search(r'<table id="readouts">(.*?)</table>', page, re.S).group(1)
    assert [readouts.count(f"<th>{name} mIoU</th>") for name in models] == [1, 1, 1]
    for image_id in ("loss-curves", "eval-curves", "grouping-heatmaps", "segmentation-maps"):
        assert re.search(rf'id="{image_id}" alt="[^"]*: clip, siglip, dreamlip"', page), image_id


def test_demo_refuses_an_unknown_model_in_one_line(tmp_path, capsys):
    from dreamlip.cli import main
    from dreamlip.config import ABLATION_VARIANTS

    assert main(["demo", "--out", str(tmp_path / "out"), "--models", "clip,dreamclip"]) == 2
    error = capsys.readouterr().err
    assert error == f"dreamlip demo: error: unknown model(s) dreamclip; choose from {', '.join(ABLATION_VARIANTS)}\n"
    assert main(["demo", "--out", str(tmp_path / "out"), "--models", ""]) == 2
    assert capsys.readouterr().err == f"dreamlip demo: error: no models given; choose from {', '.join(ABLATION_VARIANTS)}\n"
    assert main(["demo", "--out", str(tmp_path / "out"), "--models", "clip,clip"]) == 2
    assert capsys.readouterr().err == "dreamlip demo: error: models: each at most once, got clip,clip\n"
    assert not (tmp_path / "out").exists()  # refused before any work
