"""`dreamlip recaption --backend transformers` on a tiny random Qwen2-VL built from a config, offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreamlip.captions import SubcaptionSampler
from dreamlip.cli import main
from dreamlip.data import records as records_reader
from dreamlip.data import shards as shards_reader

sys.path.insert(0, str(Path(__file__).parent))
from recaption_fixtures import (  # noqa: E402
    ANSWER_TOKENS,
    build_tiny_vlm,
    make_image,
    make_jsonl_dataset,
    make_wds,
    read_jsonl,
    tar_members,
)

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_qwen2_vl"))


def recaption(data, out, captioner, model, *extra) -> int:
    return main(
        [
            "recaption",
            "--data",
            str(data),
            "--out",
            str(out),
            "--captioner",
            captioner,
            "--backend",
            "transformers",
            "--model",
            str(model),
            "--max-new-tokens",
            "24",
            "--max-new-tokens-short",
            "8",
            "--batch-size",
            "3",
            "--chunk-size",
            "4",
            "--no-progress",
            *extra,
        ]
    )


def assert_captioned(record, captioner, model):
    entry, generated = record["captions"][captioner], record["generated"][captioner]
    assert set(entry) == {"short", "long"} and set(generated) == {"model", "raw"}
    assert generated["model"] == str(model)
    assert isinstance(entry["long"], str) and entry["long"].strip()
    assert isinstance(entry["short"], str) and entry["short"].strip()
    raw = generated["raw"]
    assert set(raw) == {"short", "long"} and raw["long"]
    # the tiny model's tokens are bytes; it ends its answer after ANSWER_TOKENS, within both budgets
    assert len(raw["long"]) == len(raw["short"]) == ANSWER_TOKENS


def test_jsonl_every_image_captioned_in_the_right_fields_and_bad_images_recorded(tmp_path, model_dir):
    data = make_jsonl_dataset(tmp_path / "ds", 9, bad=True)
    out = tmp_path / "out" / "train.jsonl"
    assert recaption(data, out, "tiny", model_dir) == 0

    inputs, records = read_jsonl(data), read_jsonl(out)
    assert [r["id"] for r in records] == [r["id"] for r in inputs]  # same records, same order
    good, bad = records[:9], {r["id"]: r for r in records[9:]}
    for before, record in zip(inputs, good):
        assert_captioned(record, "tiny", model_dir)
        assert {k: record[k] for k in ("id", "raw_caption", "label")} == {
            k: before[k] for k in ("id", "raw_caption", "label")
        }
        Image.open(out.parent / record["image"]).verify()  # paths are relative to the output file
        pool = SubcaptionSampler().pool(record["captions"])  # what the trainer draws sub-captions from
        assert record["captions"]["tiny"]["short"] in pool and len(pool) >= 2
    reasons = {k: r["generated"]["tiny"]["error"] for k, r in bad.items()}
    assert {k: r.split(":")[0] for k, r in reasons.items()} == {
        "corrupt": "truncated_image",  # the trainer's reasons (dreamlip.io): a JPEG header, then text
        "truncated": "truncated_image",
        "missing": "missing_image",
        "empty": "empty_image",
    }
    assert all("captions" not in r for r in bad.values())

    table = records_reader.read_jsonl(out)  # the trainer's reader accepts the output as it is
    assert [table[i].captions.get("tiny") for i in range(len(table))] == [
        r.get("captions", {}).get("tiny") for r in records
    ]

    summary = json.loads((Path(f"{out}.work") / "summary.json").read_text())
    assert (summary["images"], summary["captioned"], summary["failed"]) == (13, 9, 4)
    failures = read_jsonl(Path(f"{out}.work") / "failures.jsonl")
    assert sorted(f["image"] for f in failures) == sorted(r["image"] for r in inputs[9:])


def test_an_image_the_model_rejects_fails_alone_and_its_batch_still_gets_captions(tmp_path, model_dir):
    data = make_jsonl_dataset(tmp_path / "ds", 3)
    Image.new("RGB", (2, 500)).save(tmp_path / "ds/images/sliver.png")  # Qwen2-VL refuses aspect ratio >= 200
    with open(data, "a") as handle:
        handle.write(json.dumps({"id": "sliver", "image": "images/sliver.png", "raw_caption": ""}) + "\n")
    out = tmp_path / "o.jsonl"
    assert recaption(data, out, "tiny", model_dir, "--batch-size", "4") == 0  # one batch of all four
    records = read_jsonl(out)
    for record in records[:3]:
        assert_captioned(record, "tiny", model_dir)
    reason = records[3]["generated"]["tiny"]["error"]
    assert reason.startswith("generation_failed: ValueError") and "aspect ratio" in reason


@pytest.mark.filterwarnings("ignore:Unfeasible length constraints")  # min_new_tokens above this budget: it wins
def test_a_budget_that_cuts_every_caption_stores_none_and_stops(tmp_path, model_dir, capsys):
    """A short-caption budget below the model's answer: every generation is cut at the limit, so
    none is stored, and a first batch that fails whole stops the run naming the reason."""
    data = make_jsonl_dataset(tmp_path / "ds", 3)
    out = tmp_path / "o.jsonl"
    assert recaption(data, out, "tiny", model_dir, "--max-new-tokens-short", str(ANSWER_TOKENS - 1)) == 2
    err = capsys.readouterr().err
    assert "every image of the first batch failed (token_limit: cut at the token limit (--max-new-tokens-short)" in err
    assert not out.exists()


def test_captioners_chain_into_the_same_records_and_reruns_skip_captioned_images(tmp_path, model_dir, capsys):
    data = make_jsonl_dataset(tmp_path / "ds", 5)
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert recaption(data, first, "one", model_dir) == 0
    assert recaption(first, second, "two", model_dir, "--temperature", "1.0", "--seed", "3") == 0
    by_first, by_second = read_jsonl(first), read_jsonl(second)
    for a, b in zip(by_first, by_second):
        assert b["captions"]["one"] == a["captions"]["one"]  # untouched
        assert_captioned(b, "two", model_dir)
        assert b["generated"]["one"] == a["generated"]["one"]
        assert b["generated"]["two"]["raw"] != a["generated"]["one"]["raw"]  # sampled, not greedy
    capsys.readouterr()

    again = tmp_path / "c.jsonl"
    assert recaption(second, again, "two", model_dir) == 0
    assert "0 captioned, 0 failed, 5 already captioned" in capsys.readouterr().err
    assert read_jsonl(again) == by_second


def test_folder_of_images_becomes_jsonl_with_sidecar_captions(tmp_path, model_dir):
    folder = tmp_path / "photos"
    for i, name in enumerate(["b/2.png", "a.jpg", "b/1.webp"]):
        make_image(folder / name, i)
    (folder / "a.txt").write_text("a photo of noise\n")
    (folder / "notes.md").write_text("not an image")
    out = tmp_path / "photos.jsonl"
    assert recaption(folder, out, "tiny", model_dir) == 0
    records = read_jsonl(out)
    assert [r["image"] for r in records] == ["photos/a.jpg", "photos/b/1.webp", "photos/b/2.png"]
    assert [r["raw_caption"] for r in records] == ["a photo of noise", "", ""]
    for record in records:
        assert_captioned(record, "tiny", model_dir)


def test_webdataset_tars_keep_every_member_and_gain_captions(tmp_path, model_dir):
    tars = make_wds(tmp_path / "shards", shards=2, per_shard=3)
    out = tmp_path / "recaptioned"
    assert recaption(tmp_path / "shards/shard-{000..001}.tar", out, "tiny", model_dir) == 0
    for tar in tars:
        before, after = tar_members(tar), dict(tar_members(out / tar.name))
        for name, data in before:
            if name.endswith(".json"):
                record = json.loads(after[name])
                original = json.loads(data)
                assert {k: record[k] for k in original} == original  # every field kept
                assert_captioned(record, "tiny", model_dir)
            else:
                assert after[name] == data  # images and texts byte for byte
        last_key = before[-1][0].split(".")[0]
        added = json.loads(after[f"{last_key}.json"])  # the sample that had no .json gets one
        assert added["raw_caption"] == f"alt text {last_key}"
        assert_captioned(added, "tiny", model_dir)
        for key in {name.split(".")[0] for name in after}:  # the trainer's shard reader accepts every sample
            sample = {
                "__key__": key,
                **{n.split(".", 1)[1]: d for n, d in after.items() if n.startswith(key + ".")},
            }
            assert shards_reader.record_from_sample(sample, strict=True).captions["tiny"]["long"]
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000.tar": 3, "shard-001.tar": 3}


def test_shards_are_disjoint_cover_everything_and_the_last_one_merges(tmp_path, model_dir, capsys):
    data = make_jsonl_dataset(tmp_path / "ds", 11)  # chunk size 4: units of 4, 4, 3 images
    out = tmp_path / "out.jsonl"
    work = Path(f"{out}.work")
    captioned = []
    for index in (2, 0, 1):
        assert recaption(data, out, "tiny", model_dir, "--shard", f"{index}/3") == 0
        summary = json.loads((work / f"summary-shard-{index}-of-3.json").read_text())
        captioned.append(summary["captioned"])
        assert out.exists() == (index == 1)  # written by the shard that finished last
    assert captioned == [3, 4, 4] and sum(captioned) == 11
    done = sorted(json.loads(p.read_text())["unit"] for p in (work / "done").glob("*.json"))
    assert done == ["data.jsonl lines 1-4", "data.jsonl lines 5-8", "data.jsonl lines 9-11"]
    records = read_jsonl(out)
    assert [r["id"] for r in records] == [f"img{i}" for i in range(11)]
    for record in records:
        assert_captioned(record, "tiny", model_dir)

    capsys.readouterr()
    assert recaption(data, out, "tiny", model_dir, "--shard", "1/3") == 0  # finished shard: nothing to do
    assert "0 captioned" in capsys.readouterr().err and read_jsonl(out) == records
