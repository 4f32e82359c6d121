"""The openai backend's API key: sent only over https or to loopback unless allowed, never logged.

No traffic ever leaves this machine: the refusals are checked before any connection (a transport
that fails the test stands in for the network), the loopback case talks to a fake server on
127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import sys
import threading
from pathlib import Path

import pytest

from dreamlip.cli import main
from dreamlip.recaption.backends import BackendError, OpenAIBackend, check_key_destination

sys.path.insert(0, str(Path(__file__).parent))
from recaption_fixtures import make_jsonl_dataset  # noqa: E402

httpx = pytest.importorskip("httpx")

KEY = "sk-test-7f3a9c1e5b"


@pytest.fixture
def no_network(monkeypatch):
    """Any request the backends' httpx clients try to send fails the test."""

    async def refuse(self, request, **kwargs):
        pytest.fail(f"a request was sent to {request.url}")

    monkeypatch.setattr(httpx.AsyncClient, "send", refuse)


@pytest.fixture
def fake_server():
    """An OpenAI-compatible endpoint on 127.0.0.1 that records the Authorization header it gets."""
    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(self.headers.get("Authorization"))
            body = json.dumps({"choices": [{"message": {"content": "A red square."}, "finish_reason": "stop"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/v1", "http://127.8.9.10/v1", "http://[::1]:8000/v1", "http://localhost/v1",
            "https://api.example.com/v1", "https://10.0.0.5:8443/v1"],
)
def test_key_may_go_over_https_or_to_loopback(url):
    check_key_destination(url, KEY)


@pytest.mark.parametrize(
    "url", ["http://10.0.0.5:8000/v1", "http://api.example.com/v1", "http://localhost.example.com/v1",
            "http://[::ffff:10.0.0.5]/v1", "http://0.0.0.0:8000/v1"],
)
def test_key_over_plain_http_to_another_host_is_refused_before_connecting(url, no_network):
    with pytest.raises(BackendError, match="refusing to send the API key in clear text over http") as info:
        OpenAIBackend(url, model="m", api_key=KEY)
    assert KEY not in str(info.value)
    check_key_destination(url, None)  # no key, nothing to protect
    check_key_destination(url, KEY, allow_insecure_key=True)
    OpenAIBackend(url, model="m", api_key=KEY, allow_insecure_key=True).close()  # no request made


def test_cli_refuses_at_start_without_reading_the_input_or_naming_the_key(
    tmp_path, monkeypatch, capsys, no_network
):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    args = ["recaption", "--data", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o.jsonl"),
            "--captioner", "c", "--backend", "openai", "--base-url", "http://192.0.2.7:8000/v1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to send the API key" in err and "--allow-insecure-key" in err and KEY not in err
    assert "not found" not in err  # refused before the input was looked at


def test_key_reaches_a_loopback_server_and_no_file_or_message(tmp_path, monkeypatch, capsys, fake_server):
    url, seen = fake_server
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    data = make_jsonl_dataset(tmp_path / "ds", 2)
    out = tmp_path / "out" / "o.jsonl"
    args = ["recaption", "--data", str(data), "--out", str(out), "--captioner", "c", "--backend", "openai",
            "--base-url", url, "--model", "m", "--no-progress"]
    assert main(args) == 0
    assert seen == [f"Bearer {KEY}"] * 4  # a long and a short caption per image
    captured = capsys.readouterr()
    assert KEY not in captured.out + captured.err
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "summary.json" for p in written)
    assert not [p for p in written if KEY.encode() in p.read_bytes()]
