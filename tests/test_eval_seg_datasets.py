"""The standard segmentation sets read from tiny fixtures written in each set's shipped layout,
their raw label values mapped to class indices, and the standard preset's settings."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NANO, run_cli
from dreamlip.checkpoint import save_checkpoint
from dreamlip.eval import EvalDataError, SegmentationTask
from dreamlip.eval.seg_datasets import BENCHMARKS, load_benchmark_mask, read_benchmark
from dreamlip.model import create_model



def _write(path, values, mode="L", image_suffix=".jpg", image_path=None):
    """A label map of ``values`` (rows) and an RGB image of its size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.array(values, dtype=np.uint8)
    mask = Image.fromarray(labels, mode="L")
    if mode == "P":  # VOC ships palette PNGs: the pixel values are the indices
        mask = mask.convert("P")
        mask.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    mask.save(path)
    if image_path is not None:
        image_path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (labels.shape[1], labels.shape[0]), (90, 120, 30)).save(image_path)


def _mapped(name, root, **kwargs):
    data = read_benchmark(name, root, **kwargs)
    return data, [load_benchmark_mask(m, data) for m in data.masks]


def test_benchmark_class_counts():
    counts = {name: len(b.classes) for name, b in BENCHMARKS.items()}
    assert counts == {
        "voc21": 21, "voc20": 20, "context60": 60, "context59": 59, "coco_stuff": 171, "coco_object": 81,
        "ade20k": 150, "cityscapes": 19,
    }  # fmt: skip
    assert all(len(set(b.classes)) == len(b.classes) for b in BENCHMARKS.values())


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    _write(root / "SegmentationClass" / "2007_000032.png", [[0, 1, 15], [255, 20, 0]], "P",
           image_path=root / "JPEGImages" / "2007_000032.jpg")  # fmt: skip
    _write(root / "SegmentationClass" / "2007_000039.png", [[5, 5], [0, 255]], "P",
           image_path=root / "JPEGImages" / "2007_000039.jpg")  # fmt: skip
    _write(root / "SegmentationClass" / "2007_000063.png", [[1]], "P")  # a train image: not in val.txt
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\n2007_000039\n")
    return root


def test_voc21_and_voc20(voc):
    data, masks = _mapped("voc21", voc)
    assert len(data.images) == 2 and data.images[0].endswith("JPEGImages/2007_000032.jpg")
    assert masks[0].tolist() == [[0, 1, 15], [255, 20, 0]]
    assert data.classnames[15] == "person" and data.classnames[0] == "background"
    data, masks = _mapped("voc20", voc)
    assert masks[0].tolist() == [[255, 0, 14], [255, 19, 255]]  # background ignored, the rest shifted
    assert data.classnames[14] == "person"


def test_a_value_outside_the_set_is_an_error_naming_the_file(voc):
    _write(voc / "SegmentationClass" / "2007_000039.png", [[21, 5]], "P")
    data = read_benchmark("voc21", voc)
    with pytest.raises(EvalDataError, match=r"2007_000039.png.*\[21\]"):
        load_benchmark_mask(data.masks[1], data)


def test_a_listed_id_without_its_files_is_an_error(voc):
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000032\nmissing\n")
    with pytest.raises(EvalDataError, match="val.txt:2: 'missing'"):
        read_benchmark("voc21", voc)


def test_pascal_context_60_and_59(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    _write(root / "SegmentationClassContext" / "2008_000008.png", [[0, 1, 59], [30, 0, 2]],
           image_path=root / "JPEGImages" / "2008_000008.jpg")  # fmt: skip
    (root / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000008\n")
    data, masks = _mapped("context60", root)
    assert masks[0].tolist() == [[0, 1, 59], [30, 0, 2]] and data.classnames[59] == "wood"
    data, masks = _mapped("context59", root)
    assert masks[0].tolist() == [[255, 0, 58], [29, 255, 1]] and data.classnames[0] == "aeroplane"


@pytest.fixture
def coco(tmp_path):
    root = tmp_path / "coco_stuff164k"
    # stuffthingmaps values are COCO ids - 1: 0 person, 12 stop sign (id 13; id 12 is unused), 91 banner, 181 wood
    _write(root / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", [[0, 12, 91], [181, 255, 0]],
           image_path=root / "val2017" / "000000000139.jpg")  # fmt: skip
    return root


def test_coco_stuff_maps_the_171_used_ids(coco):
    data, masks = _mapped("coco_stuff", coco)
    names = [[data.classnames[v] if v != 255 else None for v in row] for row in masks[0].tolist()]
    assert names == [["person", "stop sign", "banner"], ["wood", None, "person"]]


def test_coco_stuff_refuses_an_unused_id(coco):
    _write(coco / "stuffthingmaps_trainval2017" / "val2017" / "000000000139.png", [[11, 0]])
    data = read_benchmark("coco_stuff", coco)
    with pytest.raises(EvalDataError, match=r"\[11\] are not coco_stuff labels"):
        load_benchmark_mask(data.masks[0], data)


def test_coco_object_from_stuffthingmaps_and_from_mmseg_maps(coco, tmp_path):
    data, masks = _mapped("coco_object", coco)
    names = [[data.classnames[v] for v in row] for row in masks[0].tolist()]
    # stuff and unlabelled pixels become background (GroupViT's conversion)
    assert names == [["person", "stop sign", "background"], ["background", "background", "person"]]
    converted = tmp_path / "mmseg"
    _write(converted / "annotations" / "val2017" / "000000000139_instanceTrainIds.png", [[0, 80, 1]],
           image_path=converted / "images" / "val2017" / "000000000139.jpg")  # fmt: skip
    data, masks = _mapped("coco_object", converted)
    assert [data.classnames[v] for v in masks[0][0]] == ["background", "toothbrush", "person"]


def test_ade20k(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _write(root / "annotations" / "validation" / "ADE_val_00000001.png", [[0, 1, 150]],
           image_path=root / "images" / "validation" / "ADE_val_00000001.jpg")  # fmt: skip
    _write(root / "annotations" / "training" / "ADE_train_00000001.png", [[3]],
           image_path=root / "images" / "training" / "ADE_train_00000001.jpg")  # fmt: skip
    data, masks = _mapped("ade20k", root)
    assert len(data.images) == 1 and masks[0].tolist() == [[255, 0, 149]]
    assert (data.classnames[0], data.classnames[149]) == ("wall", "flag")


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    root = tmp_path / "cityscapes"
    stem = "frankfurt_000000_000294"
    _write(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_labelIds.png", [[7, 26, 0], [33, 4, 24]],
           image_path=root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")  # fmt: skip
    # the other gtFine files (colour, instance ids, polygons) are not label maps
    (root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_polygons.json").write_text("{}")
    data, masks = _mapped("cityscapes", root)
    assert len(data.images) == 1 and data.images[0].endswith(f"{stem}_leftImg8bit.png")
    names = [[data.classnames[v] if v != 255 else None for v in row] for row in masks[0].tolist()]
    assert names == [["road", "car", None], ["bicycle", None, "person"]]


def test_standard_preset_fills_what_is_unset(voc):
    task = SegmentationTask(voc, benchmark="voc21", preset="standard")
    assert (task.short_side, task.threshold, task.logit_scale, task.templates) == (336, 0.1, 40.0, "imagenet")
    mine = SegmentationTask(voc, benchmark="voc21", preset="standard", short_side=448, threshold=0.3)
    assert (mine.short_side, mine.threshold) == (448, 0.3)
    stuff = SegmentationTask(voc, benchmark="coco_stuff", preset="standard")
    assert (stuff.short_side, stuff.threshold) == (448, None)
    with pytest.raises(ValueError, match="needs a benchmark"):
        SegmentationTask(voc, preset="standard")
    assert task.describe()["classes"][:2] == ["background", "aeroplane"]


def test_cli_runs_a_benchmark_with_the_standard_preset(voc, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "nano.pt"
    save_checkpoint(checkpoint, {"model_name": NANO, "model": create_model(NANO)[0].state_dict(), "config": {}})
    out = tmp_path / "results.json"
    argv = ["--checkpoint", checkpoint, "--data", voc, "--tasks", "segmentation", "--seg-benchmark", "voc21",
            "--seg-preset", "standard", "--seg-short-side", "40", "--templates", "imagenet-simple",
            "--workers", "0", "--quiet", "--out", out]  # fmt: skip
    assert run_cli("eval", *argv) == 0
    (settings,) = json.loads(out.read_text())["tasks"]
    assert (settings["benchmark"], settings["preset"], settings["short_side"]) == ("voc21", "standard", 40)
    assert (settings["threshold"], settings["logit_scale"], settings["background"]) == (0.1, 40.0, "threshold")
    assert json.loads(out.read_text())["metrics"]["segmentation/n_images"] == 2.0
