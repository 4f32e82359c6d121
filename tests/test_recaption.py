"""`dreamlip recaption` parts that need no model: cleaning, decoding, inputs, shards, work folder, CLI."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreamlip.cli import main
from dreamlip.recaption import InputError, ManifestMismatch, WorkDir, apply_result, clean_caption, open_input
from dreamlip.io import BadSample
from dreamlip.recaption.backends import prepare_image
from dreamlip.recaption.runner import shard_units
from dreamlip.recaption.sources import Unit

sys.path.insert(0, str(Path(__file__).parent))
from data_fixtures import odd_mode_images, png_header_only  # noqa: E402
from recaption_fixtures import image_bytes, make_jsonl_dataset, make_wds, read_jsonl, tar_members  # noqa: E402

ODD = odd_mode_images()

# --- post-processing ---------------------------------------------------------------------------


def test_clean_caption_strips_openers_and_repeats_but_keeps_content():
    raw = (
        "The image shows a brown dog on a beach. The dog is running. The dog is running. "
        "In the image, we can see a red ball near the water. There is a boat. the dog is  running."
    )
    assert (
        clean_caption(raw)
        == "A brown dog on a beach. The dog is running. A red ball near the water. There is a boat."
    )


def test_clean_caption_drops_chat_preamble_and_keeps_informative_medium_words():
    raw = "Sure! Here is a detailed description of the image: This painting depicts a woman in a hat."
    assert clean_caption(raw) == "This painting depicts a woman in a hat."
    assert clean_caption("Sure.") == ""
    assert clean_caption("This is a photo of two cats sleeping.") == "Two cats sleeping."


def test_clean_caption_drops_a_fragment_cut_by_the_token_limit():
    raw = "A dog sits on grass. Behind it stands a tall"
    assert clean_caption(raw, truncated=True) == "A dog sits on grass."
    assert clean_caption(raw, truncated=False) == raw  # a sentence without a full stop is kept otherwise
    assert clean_caption("A dog sits on grass and", truncated=True) == ""  # the only one: nothing is kept
    assert clean_caption("A dog sits on grass.", truncated=True) == "A dog sits on grass."  # it ended at the limit


# --- images ------------------------------------------------------------------------------------


def test_prepare_image_passes_jpeg_through_and_reencodes_after_shrinking():
    jpeg = image_bytes(1, "JPEG")
    kept = prepare_image(jpeg)
    assert (kept.data, kept.mime, kept.pil.mode) == (jpeg, "image/jpeg", "RGB")
    small = prepare_image(jpeg, max_side=10)
    assert max(small.pil.size) == 10 and small.mime == "image/png" and small.data != jpeg
    assert prepare_image(image_bytes(1, "BMP")).mime == "image/png"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_image"),
        (b"plain text", "corrupt_image"),
        (image_bytes(2)[:60], "truncated_image"),
        (png_header_only(10_000, 10_000), "image_too_large"),  # 100 megapixels: refused from the header
    ],
)
def test_prepare_image_rejects_bad_bytes_with_the_trainers_reason(data, reason):
    with pytest.raises(BadSample) as info:
        prepare_image(data)
    assert info.value.reason == reason


def test_sixteen_bit_png_is_sent_as_its_grey_levels_not_a_white_frame():
    prepared = prepare_image(ODD["gray16.png"])  # every pixel 32896 of 65535
    assert prepared.mime == "image/png" and prepared.data != ODD["gray16.png"]  # re-encoded, 8-bit
    np.testing.assert_array_equal(np.asarray(prepared.pil), 128)
    sent = Image.open(io.BytesIO(prepared.data))  # what a server decodes
    assert sent.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(sent), 128)


def test_transparent_image_is_composited_on_white_before_sending():
    prepared = prepare_image(ODD["la.png"])  # grey 50 at alpha 128
    sent = np.asarray(Image.open(io.BytesIO(prepared.data)))
    np.testing.assert_allclose(sent, 153, atol=1)  # 50*128/255 + 255*127/255
    np.testing.assert_allclose(np.asarray(prepare_image(ODD["rgba.png"]).pil), 255)  # fully transparent


def test_exif_rotated_jpeg_is_sent_upright():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    prepared = prepare_image(buffer.getvalue())
    assert prepared.mime == "image/png" and Image.open(io.BytesIO(prepared.data)).size == (20, 40)


# --- inputs ------------------------------------------------------------------------------------


def test_jsonl_units_seek_to_the_right_lines_and_rebase_image_paths(tmp_path):
    data = make_jsonl_dataset(tmp_path / "ds", 7)
    with open(data, "a") as handle:
        handle.write("\n")  # a blank line is no record
    source = open_input(str(data), tmp_path / "out" / "x.jsonl", chunk_size=3)
    units = source.units()
    assert [u.size for u in units] == [3, 3, 2]
    ids = [[s.record["id"] for s in source.samples(u)] for u in units]
    assert ids == [["img0", "img1", "img2"], ["img3", "img4", "img5"], ["img6"]]
    sample = next(source.samples(units[1]))
    assert sample.read_image() == (tmp_path / "ds/images/0003.png").read_bytes()

    source.write_unit(units[1], lambda s: s.record, tmp_path / "staging")
    written = [json.loads(line) for line in (tmp_path / "staging/unit-000001.jsonl").read_text().splitlines()]
    assert [r["image"] for r in written] == [
        "../ds/images/0003.png",
        "../ds/images/0004.jpg",
        "../ds/images/0005.png",
    ]


def test_jsonl_bad_lines_fail_alone_with_their_reason(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(
        b'{"image": "a.png"}\n{not json\n[1, 2]\n{"image": "b.png", "raw_caption": "caf\xe9"}\n'
    )
    source = open_input(str(data), tmp_path / "o.jsonl", chunk_size=10)
    good, not_json, not_object, latin1 = source.samples(source.units()[0])
    assert good.in_output and good.record["image"] == "a.png"
    for sample, reason, detail in [
        (not_json, "bad_record", "d.jsonl:2: not valid JSON"),
        (not_object, "bad_record", "d.jsonl:3: a record must be a JSON object, got list"),
        (latin1, "text_encoding", "d.jsonl:4: not valid UTF-8"),
    ]:
        with pytest.raises(BadSample) as info:
            sample.read_image()
        assert info.value.reason == reason and info.value.detail.startswith(detail)
    assert (not_json.in_output, not_object.in_output, latin1.in_output) == (False, False, True)


def test_empty_jsonl_is_refused_naming_the_file(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n")
    with pytest.raises(InputError, match=r"empty.jsonl: holds no records$"):
        open_input(str(data), tmp_path / "o.jsonl").units()


def test_raw_caption_is_taken_from_alt_text_fields(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"image": "a.png", "caption": "alt"}\n{"image": "b.png"}\n')
    source = open_input(str(data), tmp_path / "o.jsonl")
    records = [s.record for s in source.samples(source.units()[0])]
    # renamed, not copied: the trainer's reader refuses unknown caption-like fields
    assert records == [{"raw_caption": "alt", "image": "a.png"}, {"raw_caption": "", "image": "b.png"}]


def test_webdataset_groups_members_by_key_and_round_trips_bytes(tmp_path):
    tars = make_wds(tmp_path / "in", shards=2, per_shard=3)
    source = open_input(str(tmp_path / "in"), tmp_path / "out")
    assert [u.label for u in source.units()] == ["shard-000.tar", "shard-001.tar"]
    samples = list(source.samples(source.units()[1]))
    assert [s.key for s in samples] == ["shard-001.tar:0", "shard-001.tar:1", "shard-001.tar:2"]
    assert [s.image_ref for s in samples] == [
        "shard-001.tar:0010000.png",
        "shard-001.tar:0010001.jpg",
        "shard-001.tar:0010002.png",
    ]
    assert samples[0].record == {
        "id": "0010000",
        "url": "http://x/0010000",
        "raw_caption": "alt text 0010000",
    }
    assert samples[2].record == {"raw_caption": "alt text 0010002"}  # no .json member: raw caption from .txt

    source.write_unit(source.units()[1], lambda s: s.record, tmp_path / "staging")
    before, after = tar_members(tars[1]), tar_members(tmp_path / "out/shard-001.tar")
    assert [n for n, _ in after] == [n for n, _ in before] + ["0010002.json"]
    assert all(a == b for (n, a), (_, b) in zip(before, after) if not n.endswith(".json"))


def test_webdataset_sample_with_broken_json_or_no_image_fails_alone(tmp_path):
    path = tmp_path / "in" / "s.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as archive:
        for name, data in [("a.png", image_bytes(0)), ("a.json", b"{broken"), ("b.txt", b"only text")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    source = open_input(str(path), tmp_path / "out")
    broken, textonly = source.samples(source.units()[0])
    with pytest.raises(BadSample, match="bad_record: a.json is not a JSON object"):
        broken.read_image()
    with pytest.raises(BadSample, match=r"missing_image: sample has no image member \(has: txt\)"):
        textonly.read_image()
    assert textonly.record == {"raw_caption": "only text"}


def test_open_input_refuses_ambiguous_or_missing_inputs(tmp_path):
    data = make_jsonl_dataset(tmp_path, 1)
    with pytest.raises(InputError, match="must differ"):
        open_input(str(data), data)
    with pytest.raises(InputError, match="must be a .jsonl"):
        open_input(str(data), tmp_path / "out_dir")
    with pytest.raises(InputError, match="not found"):
        open_input(str(tmp_path / "nope.jsonl"), tmp_path / "o.jsonl")
    with pytest.raises(InputError, match="no images"):
        (tmp_path / "empty").mkdir()
        open_input(str(tmp_path / "empty"), tmp_path / "o.jsonl").units()


# --- sharding and the work folder --------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 7, 12])
def test_shards_are_disjoint_and_cover_every_unit(count):
    units = [Unit(i, str(i)) for i in range(10)]
    slices = [shard_units(units, (i, count)) for i in range(count)]
    flat = [u.index for s in slices for u in s]
    assert sorted(flat) == list(range(10)) and len(flat) == len(set(flat))


def test_manifest_mismatch_refuses_to_mix_settings(tmp_path):
    work = WorkDir(tmp_path / "w")
    work.check_manifest({"captioner": "a", "prompt_long": "p"})
    work.check_manifest({"captioner": "a", "prompt_long": "p"})
    with pytest.raises(ManifestMismatch, match="prompt_long: was 'p', now 'q'"):
        work.check_manifest({"captioner": "a", "prompt_long": "q"})


def test_parts_are_read_back_and_a_duplicate_key_is_an_error(tmp_path):
    work, unit = WorkDir(tmp_path / "w"), Unit(4, "u")
    work.write_part(unit, [{"key": "1", "long": "a"}, {"key": "2", "error": "bad"}])
    work.write_part(unit, [{"key": "3", "long": "c"}])
    assert sorted(work.results(unit)) == ["1", "2", "3"]
    assert not list((tmp_path / "w/parts/unit-000004").glob(".*tmp*"))  # no temporary files left
    work.write_part(unit, [{"key": "3", "long": "again"}])
    with pytest.raises(RuntimeError, match="recorded twice"):
        work.results(unit)


def test_apply_result_keeps_every_field_and_other_captioners():
    record = {
        "image": "a.png",
        "raw_caption": "r",
        "mask": "m.png",
        "captions": {"old": {"short": "s", "long": "l"}},
    }
    raw = {"short": "S", "long": "The image shows L"}
    ok = {"short": "S", "long": "L", "raw": raw, "model": "m"}
    updated = apply_result(record, "new", ok)
    # captions.<captioner> holds only short and long (the trainer's schema); the rest is under generated
    assert updated["captions"] == {"old": {"short": "s", "long": "l"}, "new": {"short": "S", "long": "L"}}
    assert updated["generated"] == {"new": {"model": "m", "raw": raw}}
    assert {k: updated[k] for k in ("image", "raw_caption", "mask")} == {
        "image": "a.png",
        "raw_caption": "r",
        "mask": "m.png",
    }
    failed = apply_result(updated, "other", {"error": "cannot decode image"})
    assert failed["generated"]["other"] == {"error": "cannot decode image"}
    assert (
        failed["captions"] == updated["captions"]
        and failed["generated"]["new"] == updated["generated"]["new"]
    )
    retried = apply_result(failed, "other", ok)  # a later success replaces the failure
    assert retried["generated"]["other"] == {"model": "m", "raw": raw} and "other" in retried["captions"]
    assert record == {
        "image": "a.png",
        "raw_caption": "r",
        "mask": "m.png",
        "captions": {"old": {"short": "s", "long": "l"}},
    }


# --- CLI errors --------------------------------------------------------------------------------


def _cli(tmp_path, *extra):
    data = make_jsonl_dataset(tmp_path / "ds", 2)
    return main(
        [
            "recaption",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o.jsonl"),
            "--captioner",
            "c",
            "--no-progress",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shard", "3/3"], "need 0 <= I < N"),
        (["--shard", "x"], "must look like I/N"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--backend", "transformers"], "needs --model"),
        (["--backend", "openai", "--base-url", "ftp://x"], "must start with http"),
        (["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--timeout", "2"], "cannot reach"),
    ],
)
def test_cli_reports_bad_settings_without_a_traceback(tmp_path, capsys, extra, message):
    assert _cli(tmp_path, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("backend, module", [("openai", "httpx"), ("transformers", "transformers")])
def test_a_missing_backend_package_is_named_with_its_extra_before_any_work(
    tmp_path, capsys, monkeypatch, backend, module
):
    monkeypatch.setitem(sys.modules, module, None)  # what a base install without the extra has
    assert _cli(tmp_path, "--backend", backend, "--model", "m") == 2
    err = capsys.readouterr().err
    assert f"--backend {backend} needs {module} installed" in err and "pip install 'dreamlip[recaption]'" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl.work").exists()  # stopped before starting


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_explains_when_vllm_is_missing(tmp_path, capsys):
    assert _cli(tmp_path, "--backend", "vllm", "--model", "x") == 2
    assert "needs vLLM installed" in capsys.readouterr().err


def test_bad_records_and_images_are_recorded_and_the_rest_written(tmp_path, capsys):
    """No record can be captioned (no server is needed): each failure is recorded with its reason,
    unparsable lines are left out, a non-UTF-8 record is written back byte for byte."""
    root = tmp_path / "ds"
    root.mkdir()
    (root / "huge.png").write_bytes(png_header_only(10_000, 10_000))
    (root / "deep.png").write_bytes(ODD["gray16.png"])
    latin1 = b'{"image": "deep.png", "raw_caption": "caf\xe9"}'
    data = root / "d.jsonl"
    data.write_bytes(b"\n".join([b'{"image": "huge.png", "raw_caption": ""}', b"{oops", latin1, b""]))
    out = tmp_path / "o.jsonl"
    args = ["recaption", "--data", str(data), "--out", str(out), "--captioner", "c", "--no-progress"]
    assert main([*args, "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    failures = {f["key"]: f["reason"] for f in read_jsonl(Path(f"{out}.work") / "failures.jsonl")}
    assert failures["1"].startswith("image_too_large: ")
    assert failures["2"].startswith("bad_record: d.jsonl:2: not valid JSON")
    assert failures["3"].startswith("text_encoding: d.jsonl:3: not valid UTF-8")
    summary = json.loads((Path(f"{out}.work") / "summary.json").read_text())
    assert summary["failure_reasons"] == {"image_too_large": 1, "bad_record": 1, "text_encoding": 1}
    lines = out.read_bytes().splitlines()
    assert len(lines) == 2 and b"caf\xe9" in lines[1]  # the unparsable line is not in the output
    assert json.loads(lines[0])["generated"]["c"]["error"].startswith("image_too_large")


def test_merge_before_all_units_are_done_names_what_is_missing(tmp_path, capsys):
    assert _cli(tmp_path, "--merge") == 2
    assert "1 of 1 units are not finished" in capsys.readouterr().err
