"""``dreamlip serve`` under heavy requests: each size limit answered with a 413/422 before any
work, and segmentation (made slow here, as 64 long class names make it) kept off the path of
searches, with a bounded queue. The app runs in this process under uvicorn on 127.0.0.1."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NANO, free_port
from dreamlip.checkpoint import save_checkpoint
from dreamlip.model import create_model
from dreamlip.synthetic import generate

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from dreamlip.serve import app as serve_app  # noqa: E402  (needs the serve extra)
from dreamlip.serve.index import build_index, read_collection  # noqa: E402
from dreamlip.serve.readouts import ServedModel, load_served_model  # noqa: E402

SEGMENT_SECONDS = 1.5  # what the injected slow segmentation takes
pytestmark = pytest.mark.slow  # a server, and requests that wait on purpose


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server over 4 demo images and one tiny model, whose segmentation sleeps SEGMENT_SECONDS first."""
    root = tmp_path_factory.mktemp("serve-faults")
    generate(root / "data", n_train=0, n_test=4, seed=5)
    save_checkpoint(root / "model.pt", {"model_name": NANO, "model": create_model(NANO)[0].state_dict(), "config": {}})
    served = load_served_model(root / "model.pt", "model.pt")
    collection = read_collection(root / "data")
    with torch.no_grad():
        pixels = torch.stack([served.ctx.transform(Image.open(item.image).convert("RGB")) for item in collection.items])
        embeddings = served.model.encode_image(pixels)[0].numpy()
    real_segment = ServedModel.segment

    def slow_segment(self, *args, **kwargs):
        time.sleep(SEGMENT_SECONDS)
        return real_segment(self, *args, **kwargs)

    ServedModel.segment = slow_segment
    app = serve_app.create_app([served], collection, [build_index(embeddings, "exact")])
    port = free_port()
    runner = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not runner.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield url
    runner.should_exit = True
    thread.join(timeout=30)
    ServedModel.segment = real_segment


def segment(url: str, classes: list[str]) -> httpx.Response:
    return httpx.post(f"{url}/api/segment", json={"id": 0, "classes": classes}, timeout=60)


@pytest.mark.fault("serve: a search sent while 2 segmentations run")
def test_a_search_does_not_wait_behind_segmentations(server, observe):
    with ThreadPoolExecutor(2) as pool:
        started = time.monotonic()
        heavy = [pool.submit(segment, server, ["background", f"shape {i}"]) for i in range(2)]
        time.sleep(0.3)  # both admitted: one running, one queued
        search_started = time.monotonic()
        search = httpx.get(f"{server}/api/search", params={"q": "a red star"}, timeout=60)
        search_seconds = time.monotonic() - search_started
        answers = [future.result() for future in heavy]
        both_seconds = time.monotonic() - started
    observe(f"search answered in {search_seconds:.2f} s while two {SEGMENT_SECONDS} s segmentations took {both_seconds:.1f} s")
    assert search.status_code == 200 and len(search.json()["models"][0]["results"]) == 4
    assert [a.status_code for a in answers] == [200, 200]
    assert search_seconds < SEGMENT_SECONDS / 2
    assert both_seconds >= 2 * SEGMENT_SECONDS  # one at a time in their own lane


@pytest.mark.fault("serve: more segmentations than the queue holds")
def test_segmentations_beyond_the_queue_get_503_with_retry_after(server, observe):
    burst = serve_app.MAX_SEGMENT_WAITING + 3
    with ThreadPoolExecutor(burst) as pool:
        answers = list(pool.map(lambda i: segment(server, ["background", f"shape {i}"]), range(burst)))
    statuses = sorted(a.status_code for a in answers)
    observe(f"{burst} at once: {statuses.count(200)} answered, {statuses.count(503)} got 503")
    assert statuses.count(200) >= serve_app.MAX_SEGMENT_WAITING + 1 and 503 in statuses
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "5" and refused.json()["detail"].startswith("busy: ")
    assert segment(server, ["background", "star"]).status_code == 200  # the queue drained


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.fault("serve: requests over the size limits")
def test_requests_over_the_size_limits_are_refused_before_any_work(server, observe):
    app = serve_app
    cases = {
        f"{app.MAX_CLASSES + 1} classes": (segment(server, [f"class {i}" for i in range(app.MAX_CLASSES + 1)]), 422,
                                           f"{app.MAX_CLASSES + 1} classes, over the limit of {app.MAX_CLASSES} per request"),
        "a 2,000-character class name": (segment(server, ["background", "x" * 2000]), 422,
                                         f"a class name has 2000 characters, over the limit of {app.MAX_CLASS_CHARS}"),
        "a 3,000-character query": (httpx.get(f"{server}/api/search", params={"q": "y" * 3000}), 422,
                                    f"q has 3000 characters, over the limit of {app.MAX_TEXT_CHARS}"),
        f"{app.MAX_TEXTS + 1} heatmap texts": (httpx.get(f"{server}/api/heatmap", params={"id": 0, "text": [f"t{i}" for i in range(app.MAX_TEXTS + 1)]}),
                                               422, f"{app.MAX_TEXTS + 1} texts, over the limit of {app.MAX_TEXTS} per request"),
        "an 8000x6000 upload": (httpx.post(f"{server}/api/search/image", files={"file": ("big.png", _png(8000, 6000))}, timeout=60),
                                413, "uploaded file 'big.png' is 8000x6000 = 48.0 megapixels, over the limit of 40"),
    }
    for name, (response, status, detail) in cases.items():
        assert response.status_code == status, (name, response.text)
        assert response.json()["detail"] == detail, name
        assert response.elapsed.total_seconds() < SEGMENT_SECONDS, name  # refused before any (slow) work
    observe("; ".join(f"{name}: {response.status_code}" for name, (response, _, _) in cases.items()))
    small = httpx.post(f"{server}/api/search/image", files={"file": ("ok.png", _png(64, 48))}, timeout=60)
    assert small.status_code == 200
    assert np.isfinite(small.json()["models"][0]["results"][0]["score"])
