"""`dreamlip recaption --backend openai` against a misbehaving server: a fake one on 127.0.0.1
answers chosen requests with a broken gzip body, bad JSON, an HTML page, no choices, no text, a
cut-off caption or a reply dripped a few bytes a second. Each fault is retried a bounded number of
times, then recorded under one reason key; the run goes on, and no cut-off text becomes a caption."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from dreamlip.cli import main
from dreamlip.recaption.backends import FAILURE_REASONS
from dreamlip.recaption.runner import DEFAULT_PROMPT_LONG, DEFAULT_PROMPT_SHORT

sys.path.insert(0, str(Path(__file__).parent))
from recaption_fixtures import ScriptedServer, chat_reply, make_jsonl_dataset, read_jsonl  # noqa: E402

pytest.importorskip("httpx")

RETRIES = 2  # --max-retries: 3 attempts per request
FAULTS = {  # the fault's 200 reply and the reason it is recorded under
    "body not gzip": ((200, {"Content-Encoding": "gzip"}, b"this body is not gzip"), "malformed_reply"),
    "bad JSON": ((200, {}, b'{"choices": [{"message": '), "malformed_reply"),
    "HTML page": ((200, {"Content-Type": "text/html"}, b"<html><body><h1>502 Bad Gateway</h1></body></html>"), "malformed_reply"),
    "empty choices": ((200, {}, b'{"choices": []}'), "malformed_reply"),
    "null content": ((200, {}, chat_reply(None)), "empty_reply"),
    "empty text": ((200, {}, chat_reply("  ")), "empty_reply"),
}


@pytest.fixture
def server():
    """A ScriptedServer whose ``reply`` the test sets; every reply is a good caption until then."""
    scripted = ScriptedServer(lambda prompt, image, attempt: (200, {}, chat_reply("A red square.")))
    yield scripted
    scripted.close()


def recaption(data: Path, out: Path, url: str, *extra: str) -> int:
    return main(["recaption", "--data", str(data), "--out", str(out), "--captioner", "c", "--backend", "openai",
                 "--base-url", url, "--model", "m", "--concurrency", "1", "--max-retries", str(RETRIES),
                 "--retry-delay", "0.01", "--no-progress", *extra])


def failures(out: Path) -> tuple[dict[str, str], dict[str, int]]:
    """``{image number: reason}`` from failures.jsonl, and the summary's counts by reason."""
    work = Path(f"{out}.work")
    listed = {int(Path(f["image"]).stem): f["reason"] for f in read_jsonl(work / "failures.jsonl")}
    return listed, json.loads((work / "summary.json").read_text())["failure_reasons"]


@pytest.mark.parametrize("fault", [pytest.param(f, marks=pytest.mark.fault(f"recaption: a 200 reply with {f}")) for f in FAULTS])
def test_a_malformed_reply_is_retried_then_recorded_under_one_reason(tmp_path, server, fault, observe):
    """Image 0's long caption and image 1's short one always get the fault: 3 attempts each, then
    one failure each under the same key whichever caption it hit; image 2 gets it once, and its
    retry succeeds; image 3 is never touched."""
    bad, reason = FAULTS[fault]
    hit = {(DEFAULT_PROMPT_LONG, 0), (DEFAULT_PROMPT_SHORT, 1)}

    def reply(prompt, image, attempt):
        if (prompt, image) in hit or (image == 2 and attempt == 0):
            return bad
        return 200, {}, chat_reply(f"A red square number {image}.")

    server.reply = reply
    data, out = make_jsonl_dataset(tmp_path / "ds", 4), tmp_path / "o.jsonl"
    assert recaption(data, out, server.url) == 0
    records = read_jsonl(out)
    assert [("c" in r.get("captions", {})) for r in records] == [False, False, True, True]
    assert records[2]["captions"]["c"] == {"long": "A red square number 2.", "short": "A red square number 2."}
    listed, counts = failures(out)
    observe(f"rc 0; 2 of 4 images failed after {RETRIES + 1} attempts each, 1 retried into a caption: {counts}")
    assert counts == {reason: 2}
    assert listed[0].startswith(f"{reason}: ") and listed[0].endswith(f"({RETRIES + 1} attempts) [long caption]")
    assert listed[1].startswith(f"{reason}: ") and listed[1].endswith("[short caption]")
    attempts = [(prompt, image) for prompt, image, _ in server.log]
    assert attempts.count((DEFAULT_PROMPT_LONG, 0)) == attempts.count((DEFAULT_PROMPT_SHORT, 1)) == RETRIES + 1
    assert attempts.count((DEFAULT_PROMPT_LONG, 2)) == attempts.count((DEFAULT_PROMPT_SHORT, 2)) == 2
    assert attempts.count((DEFAULT_PROMPT_LONG, 3)) == 1


@pytest.mark.fault('recaption: a caption cut at the token limit (finish_reason "length")')
def test_a_caption_cut_at_the_token_limit_is_never_stored(tmp_path, server, observe):
    """``finish_reason: "length"``: a cut-off caption with no complete sentence is a `token_limit`
    failure; from a longer one only the complete sentences are kept."""
    def reply(prompt, image, attempt):
        if prompt == DEFAULT_PROMPT_LONG and image == 0:
            return 200, {}, chat_reply("A red square on a", "length")
        if prompt == DEFAULT_PROMPT_SHORT and image == 1:
            return 200, {}, chat_reply("A blue circle. It sits on a", "length")
        return 200, {}, chat_reply("A green star.")

    server.reply = reply
    data, out = make_jsonl_dataset(tmp_path / "ds", 3), tmp_path / "o.jsonl"
    assert recaption(data, out, server.url) == 0
    records = read_jsonl(out)
    assert "captions" not in records[0]
    assert records[1]["captions"]["c"] == {"long": "A green star.", "short": "A blue circle."}
    assert records[1]["generated"]["c"]["raw"]["short"] == "A blue circle. It sits on a"  # the raw text is kept
    listed, counts = failures(out)
    observe(f"a lone fragment recorded as {counts}; a longer cut caption stored as {records[1]['captions']['c']['short']!r}")
    assert counts == {"token_limit": 1}
    assert listed[0] == (
        "token_limit: cut at the token limit (--max-new-tokens) before a sentence ended: 'A red square on a' [long caption]"
    )
    assert len(server.log) == 6  # a cut caption is not retried


@pytest.mark.fault("recaption: a server that drips 4 bytes/s, --timeout 1")
def test_timeout_bounds_the_whole_request_of_a_dripping_server(tmp_path, server, observe):
    """A reply sent 4 bytes a second (about 20 s for this body) is abandoned at --timeout 1, each attempt."""
    slow = chat_reply("A red square.")
    assert len(slow) / 4 > 20
    server.reply = lambda prompt, image, attempt: (200, {}, slow, 4) if image == 0 else (200, {}, slow)
    data, out = make_jsonl_dataset(tmp_path / "ds", 2), tmp_path / "o.jsonl"
    started = time.monotonic()
    assert recaption(data, out, server.url, "--timeout", "1", "--max-retries", "1") == 0
    seconds = time.monotonic() - started
    observe(f"the run took {seconds:.1f} s: 2 attempts of 1 s for the dripped caption, then recorded as a timeout")
    assert seconds < 8  # two 1-s attempts each for image 0's two captions, and backoff
    listed, counts = failures(out)
    assert counts == {"timeout": 1}
    assert listed[0] == "timeout: no complete reply within 1 s (2 attempts) [long caption]"
    assert "c" in read_jsonl(out)[1]["captions"]


def test_a_server_that_only_sends_html_stops_the_run(tmp_path, server, capsys):
    """Every reply of the first batch malformed: a wrong URL (a web page), not bad images."""
    server.reply = lambda prompt, image, attempt: FAULTS["HTML page"][0]
    data, out = make_jsonl_dataset(tmp_path / "ds", 3), tmp_path / "o.jsonl"
    assert recaption(data, out, server.url) == 2
    err = capsys.readouterr().err
    assert "every image of the first batch failed (malformed_reply: not a chat completion: '<html>" in err
    assert "Traceback" not in err and not out.exists()


def test_every_reason_a_backend_records_is_in_the_docs_table():
    table = (Path(__file__).parents[1] / "docs" / "recaption.md").read_text()
    runner_reasons = ["token_limit", "empty_caption", "bad_record", "text_encoding", "missing_image"]
    for reason in [*FAILURE_REASONS, *runner_reasons]:
        assert f"`{reason}`" in table, reason
