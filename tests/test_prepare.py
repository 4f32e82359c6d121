"""`dreamlip prepare`: the authors' caption file joined to img2dataset's download, pre-split,
reported, resumed after SIGKILL without duplicates; end to end with img2dataset itself."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import real_layouts as layouts
from conftest import NANO, cli_command, run_cli
from dreamlip.captions import SubcaptionSampler, split_sentences
from dreamlip.prepare import PrepareConfig, prepare, quality_flags

pytest.importorskip("pyarrow")

N = 10
FAILED = {3, 7}


def test_quality_flags():
    assert quality_flags("  ", long=True) == {"empty"}
    assert quality_flags("A dog runs. A dog runs. It is sunny.", long=True) == {"repeated_sentence"}
    assert quality_flags("A dog sits on the grass. Behind it stands a tall", long=True) == {"truncated"}
    assert quality_flags("A dog sits on the grass. Behind it stands a tall", long=False) == set()  # shorts end freely
    assert quality_flags("http://x.co/12345678 #### 2024-01-01", long=False) == {"non_language"}
    assert quality_flags("Stock Photo - a red car on a road", long=False) == {"boilerplate"}
    assert quality_flags("I'm sorry, but I cannot describe this image.", long=True) == {"boilerplate"}
    assert quality_flags(["A dog runs", "It is sunny"], long=True) == set()  # pre-split: no end to judge


def _rows() -> list[dict]:
    rows = [layouts.dreamlip_row(i) for i in range(N)]
    rows[1]["longSV_captions"] = "A cat sleeps. A cat sleeps. A cat sleeps on the sofa"  # a decoding loop, cut off
    rows[4]["raw_caption"] = "Stock Photo - sunset over the sea"
    rows[5]["longIB_captions"] = ""
    return rows


@pytest.fixture
def download(tmp_path) -> tuple[Path, Path]:
    """The authors' CSV and img2dataset's webdataset output for it (written as img2dataset does,
    without the caption columns: prepare joins them by URL)."""
    rows = _rows()
    csv = layouts.write_csv(tmp_path / "cc3m_3long_3short_1raw_captions_url.csv", layouts.DREAMLIP_HEADER, rows)
    layouts.img2dataset_output(tmp_path / "download", rows, failed=FAILED, shard_size=4)
    return csv, tmp_path / "download"


def _shard_records(folder: Path) -> list[dict]:
    records = []
    for tar in sorted(folder.glob("*.tar")):
        members = layouts.tar_members(tar)
        records += [json.loads(data) for name, data in sorted(members.items()) if name.endswith(".json")]
    return records


def test_join_report_and_pre_split_shards(download, tmp_path):
    csv, images = download
    report = prepare(PrepareConfig(images=images, out=tmp_path / "out", captions=csv, shard_size=3, token_sample=1.0))
    assert (report["rows"], report["images_found"], report["images_missing"]) == (N, N - 2, 0)
    assert report["images_failed"] == {"failed_to_download": 2} and report["written"] == N - 2
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 2}
    assert report["captions"]["IB/long"] == N - 3 and report["captions"]["SV/long"] == N - 2  # row 5's IB is empty
    assert report["flags"] == {"long/repeated_sentence": 1, "long/truncated": 1, "raw_caption/boilerplate": 1}
    assert report["sentences_per_long_caption"]["count"] == 3 * (N - 2) - 1
    assert report["clip_tokens_per_sentence"]["count"] == report["words_per_sentence"]["count"]
    records = _shard_records(tmp_path / "out")
    assert sorted(r["id"] for r in records) == sorted({r["id"] for r in records})  # each sample once
    rows = {row["Image Path"]: row for row in _rows()}
    sampler = SubcaptionSampler(k=4)
    for record in records:
        row = rows[record["url"]]
        assert record["raw_caption"] == row["raw_caption"] and record["status"] == "success"
        for name in ("IB", "SV", "LLA"):
            long = row[f"long{name}_captions"]
            assert record["captions"].get(name, {}).get("long") == (split_sentences(long) or None)
        # the loader draws the same pool from the lists as it would split from the strings
        original = {n: {"short": row[f"short{n}_captions"], "long": row[f"long{n}_captions"] or None} for n in ("IB", "SV", "LLA")}
        assert sampler.pool(record["captions"]) == sampler.pool(original)


def test_drop_flagged_captions_and_workers_give_the_same_shards(download, tmp_path):
    csv, images = download
    one = prepare(PrepareConfig(images=images, out=tmp_path / "one", captions=csv, shard_size=4, drop=("boilerplate", "truncated")))
    two = prepare(PrepareConfig(images=images, out=tmp_path / "two", captions=csv, shard_size=4, workers=2,
                                drop=("boilerplate", "truncated")))
    for name in ("00000.tar", "00001.tar"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    assert one["written"] == two["written"] == N - 2 and two["rows_per_second"] > 0
    by_url = {r["url"]: r for r in _shard_records(tmp_path / "one")}
    assert by_url[layouts.url(4)]["raw_caption"] is None  # the stock-photo alt-text, dropped
    assert "long" not in by_url[layouts.url(1)]["captions"]["SV"] or by_url[layouts.url(1)]["captions"]["SV"]["long"] is None


# prepare, holding (for the kill) once the unit named by argv[1] is marked done
_HOLD_AFTER_UNIT = """
import sys, threading
from dreamlip.recaption.store import WorkDir
from dreamlip.cli import main
hold_after, real = sys.argv[1], WorkDir.mark_done
def mark_then_hold(self, unit, report):
    real(self, unit, report)
    if unit.name == hold_after:
        print("marked", flush=True)
        threading.Event().wait()
WorkDir.mark_done = mark_then_hold
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_sigkill_then_resume_writes_every_sample_once(download, tmp_path):
    csv, images = download
    args = ["prepare", "--images", images, "--captions", csv, "--shard-size", "3", "--token-sample", "0"]
    assert run_cli(*args[:1], *args[1:], "--out", tmp_path / "straight") == 0
    command = [sys.executable, "-c", _HOLD_AFTER_UNIT, "unit-000001", *map(str, args), "--out", str(tmp_path / "killed")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert process.stdout.readline().strip() == b"marked"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not list((tmp_path / "killed").glob("*.tar"))  # killed before any output shard
    result = subprocess.run(cli_command(*args, "--out", tmp_path / "killed"), capture_output=True, text=True, check=True)
    assert "rows 10: images found 8, missing 0, failed 2" in result.stdout
    assert json.loads((tmp_path / "killed" / "report.json").read_text())["units_this_run"] == 1  # 2 were done
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


@pytest.fixture
def http_images(tmp_path):
    """The fixture images on a local HTTP server (127.0.0.1, a free port), rows FAILED absent."""
    folder = tmp_path / "site"
    folder.mkdir()
    for i in range(N):
        if i not in FAILED:
            (folder / f"{i:06d}.jpg").write_bytes(layouts.jpeg(i))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_img2dataset_then_prepare_then_train(tmp_path, http_images):
    if shutil.which("img2dataset") is None and not (Path(sys.executable).parent / "img2dataset").exists():
        pytest.skip("img2dataset is not installed (pip install 'dreamlip[download]')")
    rows = [layouts.dreamlip_row(i, base=http_images) for i in range(N)]
    csv = layouts.write_csv(tmp_path / "cc3m_3long_3short_1raw_captions_url.csv", layouts.DREAMLIP_HEADER, rows)
    img2dataset = str(Path(sys.executable).parent / "img2dataset")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    subprocess.run(
        [img2dataset, "--url_list", str(csv), "--input_format", "csv", "--url_col", "Image Path",
         "--output_format", "webdataset", "--output_folder", str(tmp_path / "download"), "--processes_count", "1",
         "--thread_count", "4", "--number_sample_per_shard", "4", "--image_size", "32", "--retries", "0",
         "--enable_wandb", "False"],
        check=True, capture_output=True, env=env, timeout=300,
    )
    out = tmp_path / "shards"
    result = subprocess.run(
        cli_command("prepare", "--images", tmp_path / "download", "--captions", csv, "--out", out,
                    "--shard-size", "4", "--workers", "2", "--token-sample", "0"),
        check=True, capture_output=True, text=True,
    )
    assert f"rows {N}: images found {N - 2}, missing 0, failed 2" in result.stdout and "rows/s" in result.stdout
    assert "captions per captioner: IB/long 8, IB/short 8, LLA/long 8" in result.stdout
    records = _shard_records(out)
    assert sorted(r["raw_caption"] for r in records) == sorted(rows[i]["raw_caption"] for i in range(N) if i not in FAILED)
    assert all(r["width"] == 32 and isinstance(r["captions"]["LLA"]["long"], list) for r in records)
    settings = {"model.name": NANO, "data.workers": 0, "captions.k": 2, "optim.batch_size": 4, "optim.max_steps": 2,
                "optim.warmup_steps": 1, "run.log_every": 1, "run.progress": False}
    overrides = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    assert run_cli("train", "--data", f"wds:{out}/{{00000..00001}}.tar", "--out", tmp_path / "run", *overrides) == 0
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[-1]["skipped"] == {}
