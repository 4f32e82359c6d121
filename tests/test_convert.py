"""Long-text benchmark converters on tiny fixtures written in each set's released layout."""

import json
from pathlib import Path

import pytest
from PIL import Image

from dreamlip.cli import main
from dreamlip.convert import benchmarks
from dreamlip.convert.benchmarks import ConvertError, dci, docci, iiw, sharegpt4v, urban1k
from dreamlip.eval.datasets import read_retrieval


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _pairs(items):
    return [(Path(item["image"]).name, item["caption"]) for item in items]


def _convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


def test_urban1k_pairs_image_and_caption_files_by_name(tmp_path, capsys):
    src = tmp_path / "Urban1k"
    for name, text in (("2", "A busy street.\nsecond line ignored"), ("1", "A red tram at a stop.")):
        _image(src / "image" / f"{name}.jpg")
        (src / "caption").mkdir(parents=True, exist_ok=True)
        (src / "caption" / f"{name}.txt").write_text(text, encoding="utf-8")
    assert _convert("urban1k", src, tmp_path / "urban1k.json") == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 2
    data = read_retrieval(tmp_path / "urban1k.json")
    assert [(Path(i).name, t) for i, t in zip(data.images, data.texts)] == [
        ("1.jpg", ["A red tram at a stop."]),
        ("2.jpg", ["A busy street."]),
    ]
    (src / "image" / "2.jpg").unlink()
    with pytest.raises(ConvertError, match="1 of 2 images are missing, e.g. .*2.jpg"):
        urban1k(src)


def _sharegpt4v_entry(index: int) -> dict:
    return {
        "id": f"sa_{index}",
        "image": f"sam/images/sa_{index}.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat do you see happening in this image?"},
            {"from": "gpt", "value": f"Image {index} shows a harbour.\n\nBoats are moored."},
        ],
    }


def test_sharegpt4v_takes_the_first_1k_or_10k_gpt_captions(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmarks.SHAREGPT4V_SPLITS, "1k", 3)  # a 5-entry file stands in for the release
    data_root = tmp_path / "data"
    for i in range(5):
        _image(data_root / "sam" / "images" / f"sa_{i}.jpg")
    src = tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json"
    src.write_text(json.dumps([_sharegpt4v_entry(i) for i in range(5)]), encoding="utf-8")
    items, _ = sharegpt4v(src, "1k", images=data_root)
    assert _pairs(items) == [(f"sa_{i}.jpg", f"Image {i} shows a harbour.\n\nBoats are moored.") for i in range(3)]
    with pytest.raises(ConvertError, match="fewer than the 10000"):
        sharegpt4v(src, "10k", images=data_root)
    broken = [_sharegpt4v_entry(0), {"image": "sam/images/sa_1.jpg", "conversations": [{"from": "human", "value": "?"}]}]
    src.write_text(json.dumps(broken * 2), encoding="utf-8")
    with pytest.raises(ConvertError, match=r"entry 1\): 'conversations' needs"):
        sharegpt4v(src, "1k", images=data_root)


def _dci_fixture(root: Path) -> Path:
    base = root / "densely_captioned_images"
    splits = {"train": ["sa_10.json"], "valid": ["sa_11.json"], "test": ["sa_12.json"]}
    (base / "annotations").mkdir(parents=True)
    (base / "complete").mkdir()
    (base / "splits.json").write_text(json.dumps(splits))
    for n in (10, 11, 12):
        annotation = {
            "image": f"sa_{n}.jpg",
            "short_caption": f"A kitchen {n}.",
            "extra_caption": f"Pans hang on the wall {n}.",
            "mask_data": {"0": {"idx": 0, "label": "pan", "caption": "a pan", "mask_quality": 0}},
            "mask_keys": ["0"],
        }
        (base / "annotations" / f"sa_{n}.json").write_text(json.dumps(annotation))
        summaries = {"base": [f"A kitchen with pans {n}."], "m-0-sc": "a pan"} if n != 11 else None
        (base / "complete" / f"sa_{n}.json").write_text(json.dumps({**annotation, "summaries": summaries}))
        _image(base / "photos" / f"sa_{n}.jpg")
    return base


def test_dci_full_and_summarised_captions(tmp_path, capsys):
    base = _dci_fixture(tmp_path / "dci")
    full, skipped = dci(tmp_path / "dci")  # the parent of densely_captioned_images works too
    assert _pairs(full) == [(f"sa_{n}.jpg", f"A kitchen {n}.\nPans hang on the wall {n}.") for n in (10, 11, 12)]
    assert not skipped
    summary, skipped = dci(base, caption="summary")
    assert _pairs(summary) == [("sa_10.jpg", "A kitchen with pans 10."), ("sa_12.jpg", "A kitchen with pans 12.")]
    assert skipped == {"no_summary": 1}
    assert _pairs(dci(base, split="test")[0]) == [("sa_12.jpg", "A kitchen 12.\nPans hang on the wall 12.")]
    assert _convert("dci", base, tmp_path / "dci-summary.jsonl", "--caption", "summary") == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == {"no_summary": 1}
    assert read_retrieval(tmp_path / "dci-summary.jsonl").texts == [["A kitchen with pans 10."], ["A kitchen with pans 12."]]


def test_docci_test_split_from_the_descriptions_jsonlines(tmp_path):
    src = tmp_path / "docci"
    rows = [
        {"example_id": "test_00001", "split": "test", "image_file": "test_00001.jpg", "description": "A red kettle."},
        {"example_id": "train_00001", "split": "train", "image_file": "train_00001.jpg", "description": "A dog."},
        {"example_id": "test_00002", "split": "test", "image_file": "test_00002.jpg", "description": "Two cups."},
    ]
    _jsonl(src / "docci_descriptions.jsonlines", rows)
    for row in rows:
        _image(src / "images" / row["image_file"])
    assert _pairs(docci(src)[0]) == [("test_00001.jpg", "A red kettle."), ("test_00002.jpg", "Two cups.")]
    assert _pairs(docci(src, "train")[0]) == [("train_00001.jpg", "A dog.")]
    with (src / "docci_descriptions.jsonlines").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(ConvertError, match=r"docci_descriptions.jsonlines:4: not valid JSON"):
        docci(src)


def test_iiw_subsets_and_their_image_roots(tmp_path):
    datasets = tmp_path / "imageinwords" / "datasets"
    _jsonl(datasets / "IIW-400" / "data.jsonl", [
        {"IIW": "A globe flower.", "IIW-P5B": "machine text", "image/key": "aar_test_04600", "objects": []},
        {"IIW": "A tiled wall.", "IIW-P5B": "machine text", "image/key": "aar_test_04601", "objects": []},
    ])
    _jsonl(datasets / "DCI_Test" / "data.jsonl", [{"IIW": "A kitchen.", "ex_id": "1", "image": "sa_12.jpg"}])
    _jsonl(datasets / "DOCCI_Test" / "data.jsonl", [{"DOCCI": "old", "IIW": "A toilet.", "image": "test_00731"}])
    aar, photos, docci_images = tmp_path / "images_aar", tmp_path / "photos", tmp_path / "images"
    _image(aar / "aar_test_04600.jpg")
    _image(aar / "aar_train_04601.jpg")  # found under "train", as LoTLIP's preprocessing looks it up
    _image(photos / "sa_12.jpg")
    _image(docci_images / "test_00731.jpg")
    assert _pairs(iiw(datasets, aar_images=aar)[0]) == [
        ("aar_test_04600.jpg", "A globe flower."),
        ("aar_train_04601.jpg", "A tiled wall."),
    ]
    every = iiw(datasets, "all", aar_images=aar, dci_images=photos, docci_images=docci_images)[0]
    assert [t for _, t in _pairs(every)] == ["A toilet.", "A globe flower.", "A tiled wall.", "A kitchen."]
    with pytest.raises(ConvertError, match="--dci-images"):
        iiw(datasets, "dci-test")
    assert _convert("iiw", datasets, tmp_path / "dci-test.json", "--subset", "dci-test", "--dci-images", photos) == 0
    assert _pairs(json.loads((tmp_path / "dci-test.json").read_text())) == [("sa_12.jpg", "A kitchen.")]


def test_a_source_in_another_layout_is_a_clear_error(tmp_path, capsys):
    assert _convert("urban1k", tmp_path, tmp_path / "out.json") == 2
    assert "expected Urban1k's image/ and caption/ folders" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()
