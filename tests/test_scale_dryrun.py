"""docs/scale.md's chain, end to end on tiny data with 2 gloo ranks: img2dataset downloads the
authors' caption file's URLs (from a local HTTP server), `dreamlip prepare` joins and shards,
`dreamlip recaption` adds a captioner through an OpenAI-compatible server (vLLM's API; here a
stand-in that answers on 127.0.0.1), `torchrun` trains the vit-b-16 preset (its model swapped for
the tiny one) with each objective, and `dreamlip eval` scores the result."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import real_layouts as layouts
from conftest import NANO, cli_command, torchrun_command
from test_prepare import N, http_images  # noqa: F401  (the fixture)

pytest.importorskip("pyarrow")


class _ChatHandler(http.server.BaseHTTPRequestHandler):
    """The two routes of an OpenAI-compatible server that recaption calls: a caption per image,
    long or short by the token budget asked for."""

    def log_message(self, *args) -> None:
        pass

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._answer({"data": [{"id": "stand-in-vlm"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = (
            "The picture is filled with small coloured blocks. A bright band runs down its left half."
            if request["max_tokens"] > 100
            else "coloured blocks with a bright band"
        )
        self._answer({"choices": [{"message": {"content": text}, "finish_reason": "stop"}]})


@pytest.fixture
def chat_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(c) for c in command], check=True, capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


@pytest.mark.distributed
def test_download_prepare_recaption_train_on_two_ranks_evaluate(tmp_path, http_images, chat_server):  # noqa: F811
    rows = [layouts.dreamlip_row(i, base=http_images) for i in range(N)]
    csv = layouts.write_csv(tmp_path / "cc3m_3long_3short_1raw_captions_url.csv", layouts.DREAMLIP_HEADER, rows)
    _run([Path(sys.executable).parent / "img2dataset", "--url_list", csv, "--input_format", "csv",
          "--url_col", "Image Path", "--output_format", "webdataset", "--output_folder", tmp_path / "download",
          "--processes_count", "1", "--thread_count", "4", "--number_sample_per_shard", "4", "--image_size", "64",
          "--retries", "0", "--enable_wandb", "False"])
    shards = tmp_path / "shards"
    _run(cli_command("prepare", "--images", tmp_path / "download", "--captions", csv, "--out", shards,
                     "--shard-size", "2", "--workers", "2"))
    names = sorted(p.stem for p in shards.glob("*.tar"))
    assert names == ["00000", "00001", "00002", "00003"]  # 8 downloaded of 10 (2 are 404s), 2 a shard
    recaptioned = tmp_path / "recaptioned"
    _run(cli_command("recaption", "--data", shards, "--out", recaptioned, "--captioner", "vlm",
                     "--backend", "openai", "--base-url", chat_server, "--concurrency", "4"))
    spec = f"wds:{recaptioned}/{{{names[0]}..{names[-1]}}}.tar"
    for variant in ("clip", "dreamlip"):
        run = tmp_path / variant
        settings = {"model.name": NANO, "optim.batch_size": 2, "optim.max_steps": 2, "optim.warmup_steps": 1,
                    "data.workers": 0, "run.log_every": 1, "run.save_every": 2, "run.progress": "false"}
        overrides = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        _run(torchrun_command("train", "--preset", "vit-b-16", "--variant", variant, "--data", spec, "--out", run,
                              *overrides))
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2] and metrics[-1]["skipped"] == {}
        assert ("loss/group" not in metrics[-1]) == (variant == "clip")  # the objective the variant names
        out = tmp_path / f"{variant}.json"
        _run(cli_command("eval", "--checkpoint", run / "model.pt", "--data", spec.removeprefix("wds:"),
                         "--tasks", "retrieval,long_retrieval", "--out", out, "--workers", "0"))
        result = json.loads(out.read_text())["metrics"]
        assert result["retrieval/n_images"] == 8 and result["long_retrieval/n_texts"] == 8 * 4  # IB, SV, LLA, vlm
