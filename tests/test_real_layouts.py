"""The layouts the field publishes (tests/real_layouts.py), read as they are: the readers, then
`dreamlip train`, `eval`, `recaption` and `serve` on each."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from data_fixtures import tokenizer
from PIL import Image

import real_layouts as layouts
from conftest import NANO, run_cli
from dreamlip.captions import SubcaptionSampler, caption_text, split_sentences
from dreamlip.data.loader import build_train_loader
from dreamlip.data.records import SchemaError, read_csv, read_parquet
from dreamlip.data.shards import ShardSource

pytest.importorskip("pyarrow")

N = 8
FAILED = {2}  # row 2's URL answered 404 when img2dataset ran
CAPTIONERS = {"IB", "SV", "LLA"}


def _rows(n: int = N) -> list[dict]:
    return [layouts.dreamlip_row(i) for i in range(n)]


def _records(source: ShardSource, count: int | None = None) -> list:
    """One pass over the shards (the stream itself is endless): ``count`` or the known size."""
    stream = source.records(seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1, shuffle_buffer=1)
    return list(itertools.islice(stream, count or source.size))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Every layout, as a SPEC `dreamlip train --data` takes."""
    root = tmp_path_factory.mktemp("layouts")
    rows = _rows()
    csv = layouts.write_csv(root / "cc3m_3long_3short_1raw_captions_url.csv", layouts.DREAMLIP_HEADER, rows)
    parquet = layouts.write_parquet(root / "cc3m.parquet", layouts.DREAMLIP_HEADER, rows)
    lotlip = layouts.write_csv(root / "laion_3long_captions.csv", layouts.LOTLIP_HEADER, rows)
    files = layouts.files_url_map(root / "cc3m_files", rows, "Image Path", failed=FAILED)
    layouts.img2dataset_output(root / "i2d", rows, save_additional_columns=layouts.CAPTION_COLUMNS, failed=FAILED)
    layouts.img2dataset_output(root / "i2d_split", rows, save_additional_columns=layouts.CAPTION_COLUMNS,
                               failed=FAILED, presplit=True)
    layouts.img2dataset_output(root / "i2d_caption", rows, caption_col="raw_caption",
                               save_additional_columns=layouts.CAPTION_COLUMNS[1:])
    layouts.hf_wds(root / "cc3m-wds", rows)
    pixelprose = [layouts.pixelprose_row(i) for i in range(N)]
    layouts.write_parquet(root / "pixelprose" / "vlm_captions_cc12m_00.parquet", layouts.PIXELPROSE_COLUMNS, pixelprose)
    layouts.files_url_map(root / "pixelprose_files", pixelprose, "url")
    recap = [layouts.recap_datacomp_row(i) for i in range(N)]
    layouts.write_parquet(root / "recap" / "train-00000.parquet", layouts.RECAP_DATACOMP_COLUMNS, recap)
    layouts.files_url_map(root / "recap_files", recap, "url")
    return {
        "root": str(root),
        "dreamlip_csv": f"{csv}?urlmap={files}",  # the image root defaults to img2dataset's folder
        "dreamlip_parquet": f"{parquet}?urlmap={files}&images={files}",
        "lotlip_csv": f"{lotlip}?urlmap={files}",
        "img2dataset": f"wds:{root}/i2d/{{00000..00001}}.tar",
        "img2dataset_presplit": f"wds:{root}/i2d_split/{{00000..00001}}.tar",
        "img2dataset_caption_col": f"wds:{root}/i2d_caption/{{00000..00001}}.tar",
        "hf_wds": f"wds:{root}/cc3m-wds/cc3m-train-{{0000..0001}}.tar?samples={N}",  # it ships no sizes
        "pixelprose": f"parquet:{root}/pixelprose/vlm_captions_cc12m_{{00..00}}.parquet"
        f"?urlmap={root}/pixelprose_files",
        "recap_datacomp": f"{root}/recap/train-00000.parquet?urlmap={root}/recap_files&images={root}/recap_files",
    }


# --- readers -----------------------------------------------------------------------------------


def test_authors_csv_and_its_parquet_read_with_urls_mapped_by_img2dataset_files(data):
    root = Path(data["root"])
    csv_path = root / "cc3m_3long_3short_1raw_captions_url.csv"
    with pytest.raises(SchemaError, match=r"csv:2: field 'Image Path': is a URL; say how URLs map"):
        read_csv(csv_path)
    options = {"url_map": root / "cc3m_files"}
    from_csv, from_parquet = read_csv(csv_path, **options), read_parquet(root / "cc3m.parquet", **options)
    assert len(from_csv) == len(from_parquet) == N and from_csv.unread == ()
    for i in range(N):
        a, b, row = from_csv[i], from_parquet[i], layouts.dreamlip_row(i)
        assert (a.key, a.image, a.raw_caption, a.captions) == (b.key, b.image, b.raw_caption, b.captions)
        assert a.raw_caption == row["raw_caption"] and set(a.captions) == CAPTIONERS
        assert a.captions["LLA"]["long"] == row["longLLA_captions"]
        if i in FAILED:
            assert a.image is None  # img2dataset's log says failed_to_download: a missing image
        else:
            shard, index = divmod(i, 4)  # img2dataset's key: shard number, then the row within it
            assert Image.open(a.image).size == (48, 36) and a.image.endswith(f"{shard:05d}/{shard:05d}{index}.jpg")


def test_long_caption_only_release_needs_no_raw_caption(data):
    table = read_csv(Path(data["root"]) / "laion_3long_captions.csv", url_map=Path(data["root"]) / "cc3m_files")
    record = table[0]
    assert record.raw_caption is None and all(c["short"] is None for c in record.captions.values())
    texts = SubcaptionSampler(k=3).sample(record.raw_caption, record.captions, index=0)
    pool = SubcaptionSampler(k=3).pool(record.captions)
    assert len(texts) == 4 and set(texts) <= set(pool)  # slot 0 comes from the pool when there is no alt-text


@pytest.mark.parametrize("layout", ["img2dataset", "img2dataset_presplit"])
def test_img2dataset_shards_keep_their_metadata_and_count_from_their_stats(data, layout):
    source = ShardSource.open(data[layout].removeprefix("wds:"))
    assert source.size == N - len(FAILED) and source.unread == ()  # successes in <shard>_stats.json
    records = {r.extras["url"]: r for r in _records(source)}
    record = records[layouts.url(5)]
    row = layouts.dreamlip_row(5)
    assert record.key == "000011" and record.extras["status"] == "success" and record.extras["width"] == 48
    assert set(record.extras) >= {"key", "error_message", "original_width", "exif", "sha256"}
    long_ib = record.captions["IB"]["long"]
    if layout == "img2dataset":
        assert record.raw_caption == row["raw_caption"] and long_ib == row["longIB_captions"]
    else:  # FLAIR's pre-split lists: their pieces are the sentences, raw caption joined back
        assert long_ib == layouts.flair_presplit(row["longIB_captions"]) and split_sentences(long_ib) == long_ib
        assert record.raw_caption == row["raw_caption"]
        # each piece gets back the period FLAIR's split took (its "e.g." cut stays cut)
        assert caption_text(long_ib).startswith("The image features a black cake on a busy street. There are "
                                                "several people walking nearby, e. g. a woman with a bag. In")
        assert SubcaptionSampler(long_mode="whole").pool({"IB": {"long": long_ib}}) == [caption_text(long_ib)]


def test_txt_captions_of_hf_wds_and_img2dataset_caption_col(data):
    for layout in ("hf_wds", "img2dataset_caption_col"):
        source = ShardSource.open(data[layout].removeprefix("wds:").partition("?")[0])
        assert source.size == (None if layout == "hf_wds" else N)  # the HF repo ships no sizes.json
        records = sorted(_records(source, N), key=lambda r: r.raw_caption)
        assert [r.raw_caption for r in records] == sorted(layouts.dreamlip_row(i)["raw_caption"] for i in range(N))
    source = ShardSource.open(data["img2dataset_caption_col"].removeprefix("wds:"))
    assert all(set(r.captions) == CAPTIONERS and r.extras["url"].startswith("https://") for r in _records(source))


def test_pixelprose_and_recap_datacomp_parquet(data):
    root = Path(data["root"])
    pixelprose = read_parquet(root / "pixelprose" / "vlm_captions_cc12m_00.parquet", url_map=root / "pixelprose_files")
    record = pixelprose[3]
    assert record.raw_caption == layouts.pixelprose_row(3)["original_caption"]
    assert record.captions == {"vlm": {"short": None, "long": layouts.pixelprose_row(3)["vlm_caption"]}}
    assert record.extras["vlm_model"] == "gemini-pro-vision" and record.extras["aesthetic_score"] == 5.1
    assert Path(record.image).is_file() and pixelprose.unread == ()
    recap = read_parquet(root / "recap" / "train-00000.parquet", url_map=root / "recap_files")
    assert recap[1].raw_caption == "dog for sale 1" and recap[1].captions["recap"]["long"].startswith("A blue dog")


def test_status_not_success_is_skipped_and_counted(tmp_path):
    """img2dataset leaves failed downloads out of its tars, but other writers keep them with their
    status: such a sample is skipped as download_failed, not trained on."""
    rows = _rows(8)
    (tar,) = layouts.img2dataset_output(tmp_path, rows, save_additional_columns=layouts.CAPTION_COLUMNS, shard_size=8)
    members = layouts.tar_members(tar)
    meta = json.loads(members["000003.json"])
    members["000003.json"] = json.dumps({**meta, "status": "failed_to_resize", "error_message": "x"}).encode()
    layouts._tar(tar, list(members.items()))
    loader = build_train_loader(str(tar), sampler=SubcaptionSampler(k=2), tokenizer=tokenizer(), batch_size=7,
                                image_size=16, epoch_samples=7)
    (batch,) = list(loader)
    assert batch["skips"] == {"download_failed": 1} and len(set(batch["keys"])) == 7 and "000003" not in batch["keys"]


def test_a_folder_of_one_shard_is_a_record_source(tmp_path):
    from dreamlip.eval.datasets import read_records

    layouts.img2dataset_output(tmp_path, _rows(3), save_additional_columns=layouts.CAPTION_COLUMNS, shard_size=4)
    images, records = read_records(tmp_path)
    assert [r.raw_caption for r in records] == [layouts.dreamlip_row(i)["raw_caption"] for i in range(3)]
    assert [Path(i.path).name for i in images] == ["00000.tar"] * 3


def test_caption_fields_nothing_reads_are_named_once_at_start(tmp_path, capsys):
    rows = _rows(4)
    layouts.img2dataset_output(tmp_path, rows, caption_col="raw_caption", save_additional_columns=["raw_caption"],
                               shard_size=4)
    build_train_loader(f"{tmp_path}/00000.tar", sampler=SubcaptionSampler(k=0), tokenizer=tokenizer(), batch_size=2,
                       image_size=16)
    err = capsys.readouterr().err
    assert err.count("fields that look like captions are kept as metadata") == 1 and "00000.tar: caption" in err
    build_train_loader(f"{tmp_path}/00000.tar?resample=1", sampler=SubcaptionSampler(k=0), tokenizer=tokenizer(),
                       batch_size=2, image_size=16, rank=1, world_size=2)
    assert capsys.readouterr().err == ""  # rank 0 says it


# --- the commands ------------------------------------------------------------------------------


def _train(spec: str, out: Path, steps: int = 2) -> list[dict]:
    settings = {"model.name": NANO, "data.workers": 0, "captions.k": 2, "optim.batch_size": 4,
                "optim.max_steps": steps, "optim.warmup_steps": 1, "run.log_every": 1, "run.progress": False}
    overrides = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    assert run_cli("train", "--data", spec, "--out", out, *overrides) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout, skipped",
    [
        ("dreamlip_csv", {"missing_image": 1}),
        ("dreamlip_parquet", {"missing_image": 1}),
        ("lotlip_csv", {"missing_image": 1}),
        ("img2dataset", {}),
        ("img2dataset_presplit", {}),
        ("img2dataset_caption_col", {}),
        ("hf_wds", {}),
        ("pixelprose", {}),
        ("recap_datacomp", {}),
    ],
)
def test_train_from_the_command_line(data, tmp_path, layout, skipped):
    """Two steps of 4 images: a whole epoch of a table's 8 rows, so the failed download's row is
    met and counted once; img2dataset's tars never held it."""
    metrics = _train(data[layout], tmp_path / "run")
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["skipped"] == skipped  # the run's totals so far


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from dreamlip.checkpoint import save_checkpoint
    from dreamlip.model import create_model

    torch.manual_seed(0)
    model, _, _ = create_model(NANO)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, {"model_name": NANO, "model": model.state_dict(), "config": {}})
    return path


@pytest.mark.slow
@pytest.mark.parametrize("layout, task", [("img2dataset", "retrieval"), ("dreamlip_csv", "long_retrieval"),
                                          ("pixelprose", "retrieval")])
def test_eval_retrieval_on_real_layouts(data, checkpoint, tmp_path, layout, task):
    """`retrieval` scores the records' raw captions (they have no "texts"), `long_retrieval` every
    captioner's long caption."""
    from dreamlip.eval.datasets import EvalDataError, read_retrieval

    spec = data[layout]
    if layout == "dreamlip_csv":  # the failed download has no image: evaluation refuses, it does not drop
        with pytest.raises(EvalDataError, match=r"record 000000002\): names no local image"):
            read_retrieval(spec)
        spec = f"{data['root']}/i2d/00000.tar"
    dataset = read_retrieval(spec, texts="long" if task == "long_retrieval" else "texts")
    expected = {"img2dataset": N - 1, "dreamlip_csv": 3, "pixelprose": N}[layout]
    assert len(dataset.images) == expected
    if task == "long_retrieval":
        assert all(len(t) == 3 for t in dataset.texts)  # IB, SV and LLA's long captions
    else:
        assert all(len(t) == 1 and t[0].startswith(("a ", "A plate")) for t in dataset.texts)
    out = tmp_path / "eval.json"
    args = ["--checkpoint", checkpoint, "--data", spec, "--tasks", task, "--out", out, "--workers", "0"]
    assert run_cli("eval", *args) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics[f"{task}/n_images"] == expected and metrics[f"{task}/n_texts"] == sum(map(len, dataset.texts))
    assert 0 <= metrics[f"{task}/image_to_text_R@1"] <= metrics[f"{task}/image_to_text_R@5"] <= 100


class _EchoCaptioner:
    """Stands in for an MLLM: a caption that names the image's mean colour, so each image's
    caption is its own."""

    model_id = "echo"

    def generate(self, requests):
        from dreamlip.io import decode_image
        from dreamlip.recaption.backends import Generation

        pixels = [decode_image(request.image.data).getpixel((0, 0)) for request in requests]
        return [Generation(text=f"A picture whose first pixel is {list(p)}. It is small.") for p in pixels]

    def close(self):
        pass


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["img2dataset", "hf_wds"])
def test_recaption_real_shards_then_train_on_them(data, tmp_path, layout):
    from dreamlip.recaption import WorkDir, open_input
    from dreamlip.recaption.runner import RecaptionConfig, recaption

    folder = Path(data["root"]) / ("cc3m-wds" if layout == "hf_wds" else "i2d")
    out = tmp_path / "recaptioned"
    source = open_input(str(folder), out)
    config = RecaptionConfig(captioner="echo", progress=False, batch_size=4)
    work = WorkDir(tmp_path / "work")
    work.check_manifest(config.manifest(source, 1000))
    summary = recaption(source, work, _EchoCaptioner, config)
    count = N - (len(FAILED) if layout == "img2dataset" else 0)
    assert summary["captioned"] == count
    records = _records(ShardSource.open(f"{out}/{{{','.join(sorted(p.stem for p in out.glob('*.tar')))}}}.tar"), count)
    assert all(r.captions["echo"]["long"].startswith("A picture whose first pixel is") for r in records)
    assert sorted(r.raw_caption for r in records) == sorted(
        layouts.dreamlip_row(i)["raw_caption"] for i in range(N) if layout == "hf_wds" or i not in FAILED
    )
    if layout == "img2dataset":  # the authors' captions are still there beside the new ones
        assert all(set(r.captions) == CAPTIONERS | {"echo"} for r in records)
    spec = f"wds:{out}/{{{','.join(sorted(p.stem for p in out.glob('*.tar')))}}}.tar"
    metrics = _train(spec, tmp_path / "run")
    assert all(math.isfinite(m["loss"]) for m in metrics)


@pytest.mark.slow
@pytest.mark.parametrize("collection_of", ["img2dataset", "presplit_folder"])
def test_serve_a_real_layout(data, checkpoint, collection_of):
    from fastapi.testclient import TestClient

    from dreamlip.eval.encode import encode_images
    from dreamlip.serve.app import create_app
    from dreamlip.serve.index import build_index, read_collection
    from dreamlip.serve.readouts import load_served_model

    spec = data["img2dataset"] if collection_of == "img2dataset" else f"{data['root']}/i2d_split"  # a folder of tars
    collection = read_collection(spec)
    assert len(collection) == N - len(FAILED)
    served = load_served_model(checkpoint, "nano", "cpu")
    ctx = dataclasses.replace(served.ctx, workers=0, progress=False)
    embeddings = encode_images(ctx, [item.image for item in collection.items], "embed").numpy()
    client = TestClient(create_app([served], collection, [build_index(embeddings, "exact")]))
    found = client.get("/api/search", params={"q": "a red car", "k": 3}).json()
    assert len(found["models"][0]["results"]) == 3
    first = collection.items[0]
    info = client.get("/api/image/0").json()
    assert info["key"] == first.key and info["captions"]["raw"] == first.raw
    long_ib = next(c for c in info["captions"]["captioners"] if c["name"] == "IB")
    assert isinstance(long_ib["long"], str) and long_ib["sentences"] == split_sentences(first.captioners["IB"]["long"])
    picture = client.get("/api/image/0/file").content
    assert Image.open(io.BytesIO(picture)).size == (48, 36)
