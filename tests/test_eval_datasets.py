"""Evaluation dataset readers: every layout, and clear errors for bad input."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from dreamlip.synthetic import generate
from dreamlip.eval.datasets import (
    EvalDataError,
    TarMember,
    load_image,
    load_mask,
    read_classes,
    read_classification,
    read_linear_probe,
    read_retrieval,
    read_segmentation,
    read_templates,
)


def _png(path, colour=(200, 10, 10), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate(root, n_train=4, n_test=3, image_size=32, seed=0)
    return root


# --- classification --------------------------------------------------------------------------


def test_image_folder_classes_are_sorted_folders_and_split_subfolder_is_used(tmp_path):
    for split in ("train", "test"):
        _png(tmp_path / split / "dog" / "a.png")
        _png(tmp_path / split / "cat" / "b.jpg")
        _png(tmp_path / split / "cat" / "nested" / "c.png")
    (tmp_path / "test" / "cat" / "notes.txt").write_text("not an image")
    data = read_classification(tmp_path, split="test")
    assert data.classnames == ["cat", "dog"]
    assert sorted(zip(data.labels, [p.split("test/")[1] for p in data.images], strict=True)) == [
        (0, "cat/b.jpg"),
        (0, "cat/nested/c.png"),
        (1, "dog/a.png"),
    ]
    train, test = read_linear_probe(tmp_path)
    assert "train" in train.source and "test" in test.source and len(train.images) == 3


def test_image_folder_class_names_file_must_match_folder_count(tmp_path):
    _png(tmp_path / "n01" / "a.png")
    _png(tmp_path / "n02" / "a.png")
    (tmp_path / "names.txt").write_text("tabby cat\ngolden retriever\n")
    assert read_classification(tmp_path, classes=str(tmp_path / "names.txt")).classnames == [
        "tabby cat",
        "golden retriever",
    ]
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    with pytest.raises(EvalDataError, match="2 class folders but the classes file names 3"):
        read_classification(tmp_path, classes=str(tmp_path / "three.txt"))


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(EvalDataError, match="no images"):
        read_classification(tmp_path)
    with pytest.raises(EvalDataError, match="no class folders"):
        read_classification(tmp_path / "cat")


def test_jsonl_labels_by_index_or_name_and_errors(tmp_path):
    _png(tmp_path / "a.png")
    lines = [
        {"image": "a.png", "raw_caption": None, "label": 1},
        {"image": "a.png", "raw_caption": None, "label": "cat"},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    data = read_classification(tmp_path / "d.jsonl", classes=["cat", "dog"])
    assert data.labels == [1, 0] and data.images[0] == str((tmp_path / "a.png").resolve())
    with pytest.raises(EvalDataError, match="needs a classes file"):
        read_classification(tmp_path / "d.jsonl")
    with pytest.raises(EvalDataError, match="label 1 is not a class index 0..0"):
        read_classification(tmp_path / "d.jsonl", classes=["cat"])


def test_webdataset_shards_with_cls(tmp_path):
    shards = tmp_path / "test"
    shards.mkdir()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    with tarfile.open(shards / "000000.tar", "w") as tar:
        for i, colour in enumerate(colours):
            buffer = io.BytesIO()
            Image.new("RGB", (4, 4), colour).save(buffer, "PNG")
            for name, data in ((f"s{i}.png", buffer.getvalue()), (f"s{i}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "classnames.txt").write_text("odd one\neven one\n")  # clip_benchmark's layout
    data = read_classification(shards)
    assert data.classnames == ["odd one", "even one"] and data.labels == [0, 1, 0]
    assert all(isinstance(s, TarMember) for s in data.images)
    assert [load_image(s).getpixel((1, 1)) for s in data.images] == colours
    with pytest.raises(EvalDataError, match="label 1 is not a class index 0..0"):
        read_classification(str(shards / "{000000..000000}.tar"), classes=["only"])


# --- class lists and templates ---------------------------------------------------------------


def test_templates_builtin_and_files(tmp_path):
    imagenet = read_templates("imagenet")
    assert len(imagenet) == 80 and imagenet[0] == "a bad photo of a {}."
    (tmp_path / "t.txt").write_text("a photo of {c}.\n\nart of a {}.\n")
    assert read_templates(str(tmp_path / "t.txt")) == ["a photo of {c}.", "art of a {}."]
    (tmp_path / "t.json").write_text(json.dumps({"cat": ["a cat"], "dog": ["a dog"]}))
    assert read_templates(str(tmp_path / "t.json")) == {"cat": ["a cat"], "dog": ["a dog"]}
    with pytest.raises(EvalDataError, match="no '{}' or '{c}'"):
        read_templates(["a photo"])
    with pytest.raises(EvalDataError, match="not a template file"):
        read_templates("imagenet-80")


def test_classes_file_forms(tmp_path, demo):
    classes = read_classes(str(demo / "classes.json"), "segmentation")
    assert classes.names[0] == "background" and classes.ignore_index == 255 and classes.templates
    assert len(read_classes("imagenet").names) == 1000
    (tmp_path / "dup.txt").write_text("a\na\n")
    with pytest.raises(EvalDataError, match="duplicate"):
        read_classes(str(tmp_path / "dup.txt"))


# --- retrieval -------------------------------------------------------------------------------


def test_demo_retrieval_texts_and_long_captions(demo):
    human = read_retrieval(demo)
    records = [json.loads(line) for line in (demo / "test.jsonl").read_text().splitlines()]
    assert human.texts == [r["texts"] for r in records]
    long = read_retrieval(demo, texts="long")
    assert long.texts == [[c["long"] for c in r["captions"].values()] for r in records]
    assert read_retrieval(demo, texts="long:SV").texts == [[r["captions"]["SV"]["long"]] for r in records]


def test_karpathy_split_json(tmp_path):
    coco = {
        "images": [
            {
                "filepath": "val2014",
                "filename": "a.jpg",
                "split": "test",
                "sentences": [{"raw": "x"}, {"raw": "y"}],
            },
            {"filepath": "val2014", "filename": "b.jpg", "split": "val", "sentences": [{"raw": "z"}]},
            {"filepath": "train2014", "filename": "c.jpg", "split": "test", "sentences": [{"raw": "w"}]},
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(coco))
    data = read_retrieval(tmp_path / "dataset_coco.json", images=tmp_path / "coco")
    assert data.images == [str(tmp_path / "coco/val2014/a.jpg"), str(tmp_path / "coco/train2014/c.jpg")]
    assert data.texts == [["x", "y"], ["w"]]
    with pytest.raises(EvalDataError, match="no images in split 'train'.*splits: test, val"):
        read_retrieval(tmp_path / "dataset_coco.json", split="train")


def test_long_caption_sets_as_json_or_jsonl(tmp_path):
    items = [
        {"image": "i/1.jpg", "caption": "A long caption. Two sentences."},
        {"image": "i/2.jpg", "texts": ["a", "b"]},
    ]
    (tmp_path / "urban.json").write_text(json.dumps(items))
    (tmp_path / "urban.jsonl").write_text("\n".join(json.dumps(x) for x in items))
    for name in ("urban.json", "urban.jsonl"):
        data = read_retrieval(tmp_path / name)
        assert data.images == [str(tmp_path / "i/1.jpg"), str(tmp_path / "i/2.jpg")]
        assert data.texts == [["A long caption. Two sentences."], ["a", "b"]]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.jpg", "caption": ""}]))
    with pytest.raises(EvalDataError, match="no texts"):
        read_retrieval(tmp_path / "bad.json")


# --- segmentation ----------------------------------------------------------------------------


def test_demo_segmentation_reads_classes_json(demo):
    data = read_segmentation(demo)
    assert data.classnames[0] == "background" and len(data.classnames) == 9
    assert data.ignore_index == 255 and len(data.masks) == 3
    mask = load_mask(data.masks[0], len(data.classnames), data.ignore_index)
    assert mask.shape == (32, 32) and mask.max() > 0


def _voc(root, values):
    _png(root / "JPEGImages" / "2007_000001.jpg", size=(5, 4))
    mask = Image.fromarray(np.array(values, dtype=np.uint8), "P")
    mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [255, 255, 255] * 253)
    (root / "SegmentationClass").mkdir(parents=True)
    mask.save(root / "SegmentationClass" / "2007_000001.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n")


def test_voc_folder_palette_masks_are_class_indices(tmp_path):
    values = [[0, 0, 1, 1, 2], [0, 255, 1, 2, 2], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    _voc(tmp_path, values)
    (tmp_path / "classes.txt").write_text("background\naeroplane\nbicycle\n")
    data = read_segmentation(tmp_path, split="val")
    assert data.classnames == ["background", "aeroplane", "bicycle"] and data.ignore_index == 255
    np.testing.assert_array_equal(load_mask(data.masks[0], 3, 255), values)


def test_class_list_that_does_not_match_the_masks_is_a_clear_error(tmp_path):
    _voc(tmp_path, [[0, 0, 1, 1, 2]] * 4)
    (tmp_path / "classes.txt").write_text("background\naeroplane\n")
    data = read_segmentation(tmp_path, split="val")
    with pytest.raises(EvalDataError, match=r"mask value\(s\) \[2\] outside the class list \(2 classes"):
        load_mask(data.masks[0], len(data.classnames), data.ignore_index)


def test_voc_folder_needs_a_class_list_and_rgb_masks_are_refused(tmp_path):
    _voc(tmp_path, [[0] * 5] * 4)
    with pytest.raises(EvalDataError, match="needs a class list"):
        read_segmentation(tmp_path, split="val")
    rgb = _png(tmp_path / "rgb.png")
    with pytest.raises(EvalDataError, match="single-channel label map"):
        load_mask(str(rgb), 3, 255)


def test_unreadable_image_is_an_error_not_a_skip(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvalDataError, match="broken.png: corrupt_image"):
        load_image(str(tmp_path / "broken.png"))
