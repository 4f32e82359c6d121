"""`dreamlip recaption --backend openai` against a real server: `transformers serve` on a tiny local model.

A fault-injecting proxy (tests/recaption_fixtures.py) sits between the client and the server to
answer chosen requests with 503, 400 or 404, and to slow requests down for the kill/resume test.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dreamlip.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from recaption_fixtures import (  # noqa: E402
    FaultProxy,
    TransformersServer,
    build_tiny_vlm,
    make_jsonl_dataset,
    read_jsonl,
)

for _module in ("transformers", "fastapi", "uvicorn", "openai", "accelerate"):  # transformers[serving]
    pytest.importorskip(_module)

BUDGET = ["--max-new-tokens", "16", "--max-new-tokens-short", "6"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_qwen2_vl"))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    running = TransformersServer(model_dir, tmp_path_factory.mktemp("serve") / "serve.log")
    yield running
    running.close()


@pytest.fixture
def proxy(server):
    running = FaultProxy(server.url)
    yield running
    running.close()


def cli_args(data, out, proxy, model_dir, *extra):
    return [
        "recaption",
        "--data",
        str(data),
        "--out",
        str(out),
        "--captioner",
        "served",
        "--backend",
        "openai",
        "--base-url",
        proxy.url,
        "--model",
        str(model_dir),
        "--retry-delay",
        "0.01",
        "--max-retries",
        "2",
        "--chunk-size",
        "5",
        "--no-progress",
        *BUDGET,
        *extra,
    ]


def test_server_captions_match_the_local_transformers_backend(tmp_path, model_dir, proxy):
    data = make_jsonl_dataset(tmp_path / "ds", 6)
    assert main(cli_args(data, tmp_path / "served.jsonl", proxy, model_dir, "--concurrency", "3")) == 0
    assert proxy.log == [200] * 12  # one long and one short request per image
    local = tmp_path / "local.jsonl"
    assert (
        main(
            [
                "recaption",
                "--data",
                str(data),
                "--out",
                str(local),
                "--captioner",
                "served",
                "--model",
                str(model_dir),
                "--batch-size",
                "1",
                "--no-progress",
                *BUDGET,
            ]
        )
        == 0
    )
    served, expected = read_jsonl(tmp_path / "served.jsonl"), read_jsonl(local)
    for a, b in zip(served, expected):
        assert a["generated"]["served"]["raw"] == b["generated"]["served"]["raw"]  # same model, greedy
        assert a["generated"]["served"]["raw"]["long"]


def test_503_is_retried_until_the_server_answers(tmp_path, model_dir, proxy):
    data = make_jsonl_dataset(tmp_path / "ds", 3)
    proxy.script = [503, 503]
    assert main(cli_args(data, tmp_path / "o.jsonl", proxy, model_dir, "--concurrency", "1")) == 0
    assert proxy.log == [503, 503] + [200] * 6
    assert all("served" in r["captions"] for r in read_jsonl(tmp_path / "o.jsonl"))


def _marker(image_path: Path) -> bytes:
    """A piece of the image's base64 that no other image shares (their headers are alike)."""
    return base64.b64encode(image_path.read_bytes())[-120:]


def test_400_is_recorded_for_that_image_and_503_gives_up_after_the_retries(tmp_path, model_dir, proxy):
    data = make_jsonl_dataset(tmp_path / "ds", 4)
    proxy.refuse = {
        _marker(tmp_path / "ds/images/0001.png"): 400,
        _marker(tmp_path / "ds/images/0002.jpg"): 503,
    }
    assert main(cli_args(data, tmp_path / "o.jsonl", proxy, model_dir)) == 0
    records = read_jsonl(tmp_path / "o.jsonl")
    assert records[1]["generated"]["served"]["error"] == "http_error: HTTP 400 (not retried): injected 400 [long caption]"
    assert records[2]["generated"]["served"]["error"] == "server_error: HTTP 503: injected 503 (3 attempts) [long caption]"
    assert all("served" in records[i]["captions"] for i in (0, 3))
    # 400: one request per prompt; 503: three attempts per prompt; the others: one each
    assert (proxy.log.count(400), proxy.log.count(503), proxy.log.count(200)) == (2, 6, 4)
    summary = json.loads((tmp_path / "o.jsonl.work/summary.json").read_text())
    assert summary["failure_reasons"] == {"http_error": 1, "server_error": 1}


def test_404_stops_the_run_with_a_clear_error(tmp_path, model_dir, proxy, capsys):
    data = make_jsonl_dataset(tmp_path / "ds", 2)
    proxy.refuse = {b'"model"': 404}
    assert main(cli_args(data, tmp_path / "o.jsonl", proxy, model_dir)) == 2
    err = capsys.readouterr().err
    assert "answered HTTP 404: injected 404 (check --base-url, --model and --api-key)" in err
    assert "Traceback" not in err and not (tmp_path / "o.jsonl").exists()


def _recorded(work: Path) -> int:
    """Images with a result so far: lines of the part files plus the counts of finished units."""
    while True:
        try:  # the running process removes a unit's parts once the unit is written out
            parts = sum(len(p.read_text().splitlines()) for p in work.glob("parts/*/part-*.jsonl"))
            reports = [json.loads(p.read_text()) for p in work.glob("done/*.json")]
            return parts + sum(r["captioned"] + r["failed"] for r in reports)
        except FileNotFoundError:
            continue


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_captions_every_image_exactly_once(tmp_path, model_dir, proxy):
    data = make_jsonl_dataset(tmp_path / "ds", 20, bad=True)  # 24 records, 4 of them unusable
    out, work = tmp_path / "o.jsonl", tmp_path / "o.jsonl.work"
    command = [
        sys.executable,
        "-m",
        "dreamlip.cli",
        *cli_args(data, out, proxy, model_dir, "--concurrency", "2", "--batch-size", "2"),
    ]
    proxy.delay = 0.04
    kills = 0
    for attempt in range(3):
        before = _recorded(work) if work.exists() else 0
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while process.poll() is None and (not work.exists() or _recorded(work) <= before):
            time.sleep(0.005)
        time.sleep(0.03 * attempt)  # kill at different moments: right after a write, mid-batch, ...
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            kills += process.wait() == -signal.SIGKILL
        assert not out.exists()
    assert kills == 3
    assert subprocess.run(command, capture_output=True).returncode == 0

    records = read_jsonl(out)
    assert [r["id"] for r in records] == [r["id"] for r in read_jsonl(data)]  # each record exactly once
    for record in records[:20]:
        assert list(record["captions"]) == ["served"] and list(record["generated"]["served"]) == [
            "model",
            "raw",
        ]
    assert all(list(r["generated"]["served"]) == ["error"] and "captions" not in r for r in records[20:])
    summary = json.loads((work / "summary.json").read_text())
    assert (summary["captioned"], summary["failed"]) == (20, 4)
    # Resumed runs skip recorded images: a kill redoes at most the batch in flight (2 images x 2 prompts).
    assert 40 <= len(proxy.log) <= 40 + kills * 4
    # temporary files of interrupted writes were cleared by the writes that followed
    assert not list(tmp_path.glob(".o.jsonl.tmp-*")) and not list((work / "staging").glob(".*"))
