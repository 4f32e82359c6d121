"""``dreamlip serve``: the JSON API against a real server process on 127.0.0.1, every answer
checked against the same quantity computed here directly from the model; the index and the
embedding cache in-process; and the page in headless Chromium (skipped where it is absent)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NANO, free_port
from dreamlip.captions import split_sentences
from dreamlip.checkpoint import save_checkpoint
from dreamlip.loading import load_model
from dreamlip.synthetic import generate
from dreamlip.eval.segmentation import Segmenter
from dreamlip.losses import group_patches
from dreamlip.model import create_model
from dreamlip.serve.index import (
    Collection,
    ExactIndex,
    FaissIndex,
    cache_key,
    cached_embeddings,
    faiss_available,
    read_collection,
)
from dreamlip.serve.app import model_names
from dreamlip.serve.readouts import center_square, load_served_model

httpx = pytest.importorskip("httpx")

N_IMAGES = 6
UPLOAD_LIMIT_MB = 0.05  # the server under test refuses bodies over 52 KB; a demo image is ~5 KB


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo images, two differently initialised tiny models, and a server over them."""
    root = tmp_path_factory.mktemp("serve")
    generate(root / "data", n_train=0, n_test=N_IMAGES, seed=3)
    checkpoints = []
    for seed, name in ((0, "dreamlip"), (1, "clip")):
        torch.manual_seed(seed)
        model, _, _ = create_model(NANO)
        path = root / "runs" / name / "model.pt"
        save_checkpoint(path, {"model_name": NANO, "model": model.state_dict(), "config": {}})
        checkpoints.append(path)
    port = free_port()
    command = [
        sys.executable, "-m", "dreamlip.cli", "serve",
        "--checkpoint", str(checkpoints[0]), "--compare", str(checkpoints[1]),
        "--images", str(root / "data"), "--port", str(port), "--workers", "0",
        "--max-upload-mb", str(UPLOAD_LIMIT_MB),
    ]  # fmt: skip
    log = open(root / "server.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                log.seek(0)
                pytest.fail(f"dreamlip serve exited with {server.returncode}:\n{log.read()}")
            try:
                httpx.get(f"{url}/api/info", timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail("dreamlip serve did not answer within 120 s")
                time.sleep(0.3)
        yield {"url": url, "root": root, "checkpoints": checkpoints, "log": root / "server.log"}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def direct(setup):
    """The models and the collection as this process sees them, to compute the expected answers."""
    models = [(loaded.model, loaded.eval_transform, loaded.tokenizer) for loaded in map(load_model, setup["checkpoints"])]
    records = [json.loads(line) for line in (setup["root"] / "data" / "test.jsonl").read_text().splitlines()]
    images = [Image.open(setup["root"] / "data" / r["image"]).convert("RGB") for r in records]
    with torch.no_grad():
        embeddings = [model.encode_image(torch.stack([transform(i) for i in images]))[0] for model, transform, _ in models]
    return {"models": models, "records": records, "images": images, "embeddings": embeddings}


def get(setup, path, **params):
    return httpx.get(setup["url"] + path, params=params, timeout=60)


# ---------------------------------------------------------------------------------------------
# The API


def test_info_names_both_models(setup):
    info = get(setup, "/api/info").json()
    assert info["images"] == N_IMAGES
    assert info["models"] == ["dreamlip/model.pt", "clip/model.pt"]
    assert info["index"] == ("faiss" if faiss_available() else "exact")
    assert "background" in info["classes"]


def test_text_search_ranks_the_collection_as_the_model_does(setup, direct):
    # An untrained model's ranking is not the caption's own image; what the server owes is the
    # model's own ranking: every image, ordered by cosine similarity to the query's embedding.
    caption = direct["records"][2]["captions"]["IB"]["short"]
    answer = get(setup, "/api/search", q=caption, k=N_IMAGES).json()
    assert answer["query"] == caption and [m["name"] for m in answer["models"]] == ["dreamlip/model.pt", "clip/model.pt"]
    for (model, _, tokenizer), embeddings, column in zip(direct["models"], direct["embeddings"], answer["models"]):
        with torch.no_grad():
            query = model.encode_text(tokenizer([caption]))[0]
        scores = (embeddings @ query).numpy()
        assert [hit["id"] for hit in column["results"]] == np.argsort(-scores).tolist()
        np.testing.assert_allclose([hit["score"] for hit in column["results"]], np.sort(scores)[::-1], atol=1e-4)
        assert [hit["key"] for hit in column["results"]] == [direct["records"][i]["id"] for i in np.argsort(-scores)]
    assert len(get(setup, "/api/search", q=caption, k=2).json()["models"][0]["results"]) == 2


def test_image_upload_finds_the_image_itself(setup, direct):
    for index, record in enumerate(direct["records"]):
        data = (setup["root"] / "data" / record["image"]).read_bytes()
        response = httpx.post(setup["url"] + "/api/search/image", params={"k": 3}, files={"file": ("q.png", data)}, timeout=60)
        assert response.status_code == 200, response.text
        for column in response.json()["models"]:
            top = column["results"][0]
            assert top["id"] == index
            assert top["score"] == pytest.approx(1.0, abs=1e-4)


def test_image_record_has_its_captions_and_sub_captions(setup, direct):
    record = direct["records"][1]
    answer = get(setup, "/api/image/1").json()
    assert (answer["key"], answer["width"], answer["height"]) == (record["id"], 64, 64)
    assert answer["captions"]["raw"] == record["raw_caption"]
    assert answer["captions"]["texts"] == record["texts"]
    by_name = {c["name"]: c for c in answer["captions"]["captioners"]}
    assert by_name.keys() == record["captions"].keys()
    for name, captions in record["captions"].items():
        assert by_name[name]["short"] == captions["short"]
        assert by_name[name]["sentences"] == split_sentences(captions["long"])
    served = Image.open(io.BytesIO(get(setup, answer["file"]).content))
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(direct["images"][1]))


def test_heatmaps_are_the_grouping_weights(setup, direct):
    record = direct["records"][4]
    texts = split_sentences(record["captions"]["SV"]["long"])[:3] + ["a red star"]
    answer = httpx.get(setup["url"] + "/api/heatmap", params=[("id", 4)] + [("text", t) for t in texts], timeout=60).json()
    assert answer["texts"] == texts and answer["box"] == [0, 0, 64, 64]
    for (model, transform, tokenizer), column in zip(direct["models"], answer["models"]):
        with torch.no_grad():
            _, patches = model.encode_image(transform(direct["images"][4])[None], with_patches=True)
            _, weights = group_patches(model.encode_text(tokenizer(texts))[None], patches)
        assert column["grid"] == [4, 4]
        maps = np.asarray(column["heatmaps"])
        assert maps.shape == (len(texts), 4, 4)
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)  # each text's weights sum to 1
        np.testing.assert_allclose(maps.reshape(len(texts), -1), weights[0].numpy(), atol=1e-5)
        assert (maps == 0).any()  # below-threshold patches are zeroed, as in the loss


def test_heatmap_covers_the_central_square_of_a_wide_image(setup, direct):
    served = load_served_model(setup["checkpoints"][0], "m")
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    assert center_square(wide) == (15, 0, 55, 40)
    model, transform, tokenizer = direct["models"][0]
    with torch.no_grad():
        _, patches = model.encode_image(transform(wide.crop((15, 0, 55, 40)))[None], with_patches=True)
        _, weights = group_patches(model.encode_text(tokenizer(["a cat"]))[None], patches)
    np.testing.assert_allclose(served.heatmaps(wide, ["a cat"]).reshape(1, -1), weights[0].numpy(), atol=1e-6)


def test_segment_gives_a_label_map_of_the_image_size(setup, direct):
    classes = ["background", "circle", "star", "square"]
    response = httpx.post(setup["url"] + "/api/segment", json={"id": 0, "classes": classes}, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["width"], answer["height"], answer["classes"]) == (64, 64, classes)
    for (model, transform, tokenizer), column in zip(direct["models"], answer["models"]):
        labels = np.asarray(column["labels"])
        assert labels.shape == (64, 64)
        expected = Segmenter(model, tokenizer, transform, classes)(direct["images"][0])
        assert np.array_equal(labels, expected)


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status"),
    [
        ("get", "/api/image/99", {}, 404),
        ("get", "/api/image/-1", {}, 404),
        ("get", "/api/image/abc", {}, 422),
        ("get", "/api/image/99/file", {}, 404),
        ("get", "/api/heatmap", {"params": {"id": 99, "text": "a cat"}}, 404),
        ("get", "/api/heatmap", {"params": {"id": 0}}, 422),
        ("get", "/api/heatmap", {"params": {"id": 0, "text": "  "}}, 400),
        ("get", "/api/search", {"params": {"q": "   "}}, 400),
        ("get", "/api/search", {"params": {"q": "x" * 3000}}, 422),
        ("get", "/api/search", {}, 422),
        ("get", "/api/search", {"params": {"q": "a cat", "k": 0}}, 422),
        ("get", "/api/search", {"params": {"q": "a cat", "k": "many"}}, 422),
        ("post", "/api/segment", {"json": {"id": 99, "classes": ["cat"]}}, 404),
        ("post", "/api/segment", {"json": {"id": 0, "classes": []}}, 422),
        ("post", "/api/segment", {"json": {"id": 0, "classes": ["cat", "cat"]}}, 400),
        ("post", "/api/segment", {"json": {"id": 0, "classes": ["cat"], "dense": "bogus"}}, 400),
        ("post", "/api/segment", {"content": b"not json", "headers": {"content-type": "application/json"}}, 422),
        ("post", "/api/search/image", {"files": {"file": ("x.png", b"not an image")}}, 400),
        ("post", "/api/search/image", {}, 422),
        ("post", "/api/search/image", {"files": {"file": ("big.png", b"\0" * 60_000)}}, 413),
        ("post", "/api/segment", {"content": b"{" + b" " * 60_000 + b"}", "headers": {"content-type": "application/json"}}, 413),
        ("get", "/no/such/page", {}, 404),
    ],
)
def test_bad_requests_get_json_errors(setup, method, path, kwargs, status):
    response = httpx.request(method.upper(), setup["url"] + path, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert "detail" in response.json() and "Traceback" not in response.text


def test_oversized_upload_without_a_declared_length_is_refused(setup):
    def chunks():  # a multipart body of 80 KB sent chunked: no Content-Length to refuse it by
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(20):
            yield b"\0" * 4096

    response = httpx.post(setup["url"] + "/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}, timeout=60)
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_no_request_failed_inside_the_server(setup):
    assert "Traceback" not in setup["log"].read_text()


# ---------------------------------------------------------------------------------------------
# In-process: collection, cache, index, names


def test_index_finds_the_exact_top_k_in_chunks(monkeypatch):
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    index = ExactIndex(embeddings)
    index.chunk = 128  # eight chunks: the top k must be merged across them
    scores, ids = index.search(queries, 7)
    for q in range(3):
        brute = embeddings @ queries[q]
        expected = sorted(range(1000), key=lambda i: -brute[i])[:7]
        assert ids[q].tolist() == expected
        np.testing.assert_allclose(scores[q], brute[expected], rtol=1e-5)
    assert index.search(queries, 5000)[1].shape == (3, 1000)  # k over N: every image once
    if faiss_available():
        faiss_scores, faiss_ids = FaissIndex(embeddings).search(queries, 7)
        assert faiss_ids.tolist() == ids.tolist()
        np.testing.assert_allclose(faiss_scores, scores, rtol=1e-4)


def test_cache_is_reused_and_keyed_by_checkpoint_and_files(tmp_path):
    images = []
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
        images.append(tmp_path / f"{i}.png")
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights v1")
    collection = read_collection(tmp_path)
    assert [item.key for item in collection.items] == ["0.png", "1.png", "2.png"]
    calls = []

    def embed():
        calls.append(1)
        return np.eye(3, 4)

    key = cache_key(checkpoint, collection, 32)
    first = cached_embeddings(checkpoint, collection, key, embed)
    again = cached_embeddings(checkpoint, collection, key, embed)
    assert len(calls) == 1 and np.array_equal(first, again) and again.dtype == np.float32
    assert (tmp_path / "model.pt.serve-cache" / f"{key}.npy").is_file()
    assert not list((tmp_path / "model.pt.serve-cache").glob("*.tmp"))
    checkpoint.write_bytes(b"weights v2")
    assert cache_key(checkpoint, collection, 32) != key  # other weights
    checkpoint.write_bytes(b"weights v1")
    assert cache_key(checkpoint, collection, 32) == key
    assert cache_key(checkpoint, collection, 64) != key  # another input size
    fewer = Collection(collection.items[:2], collection.source)
    assert cache_key(checkpoint, fewer, 32) != key  # another file list
    os.utime(images[0], ns=(1, 1))
    assert cache_key(checkpoint, collection, 32) != key  # a file changed


def test_collection_from_a_plain_folder_and_a_caption_file(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "b.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = read_collection(tmp_path)
    assert [(i.key, i.raw, i.texts) for i in folder.items] == [("a.png", None, []), ("sub/b.jpg", None, [])]
    (tmp_path / "captions.json").write_text(json.dumps([{"image": "a.png", "caption": "a black square"}]))
    captioned = read_collection(tmp_path / "captions.json")
    assert [(i.key, i.texts) for i in captioned.items] == [("a.png", ["a black square"])]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        read_collection(tmp_path / "empty")


def test_model_names_tell_the_models_apart():
    assert model_names(["/r/clip/model.pt", "/r/dreamlip/model.pt"]) == ["clip/model.pt", "dreamlip/model.pt"]
    assert model_names(["/r/a.pt", "/s/b.pt"]) == ["a.pt", "b.pt"]
    assert model_names(["/r/a.pt", "/r/a.pt"]) == ["a.pt #1", "a.pt #2"]


# ---------------------------------------------------------------------------------------------
# The page, in a real browser


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.mark.slow
def test_page_searches_and_shows_heatmaps_in_a_browser(setup, direct, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    screenshots = Path(os.environ.get("DREAMLIP_SCREENSHOTS", tmp_path))
    browser = _chrome()
    try:
        wait = WebDriverWait(browser, 60, ignored_exceptions=[StaleElementReferenceException])  # re-rendered grids
        browser.get(setup["url"] + "/")
        wait.until(ready.text_to_be_present_in_element((By.ID, "info"), f"{N_IMAGES} images"))
        query = browser.find_element(By.ID, "q")
        query.send_keys(direct["records"][2]["captions"]["IB"]["short"])
        browser.find_element(By.CSS_SELECTOR, "#search-form button").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".column .card")) == 2 * N_IMAGES)
        titles = ["dreamlip/model.pt", "clip/model.pt"]  # read in the wait: a re-render makes the elements stale
        wait.until(lambda b: [c.find_element(By.TAG_NAME, "h2").text for c in b.find_elements(By.CSS_SELECTOR, ".column")] == titles)
        wait.until(lambda b: all(img.get_property("naturalWidth") == 64 for img in b.find_elements(By.CSS_SELECTOR, ".card img")))
        browser.save_screenshot(str(screenshots / "serve-search.png"))

        # Search by an uploaded image: each column starts with that image itself.
        browser.find_element(By.ID, "upload").send_keys(str(setup["root"] / "data" / direct["records"][3]["image"]))
        wait.until(lambda b: [c.get_attribute("data-id") for c in b.find_elements(By.CSS_SELECTOR, ".column .card:first-child")] == ["3", "3"])
        image_results = browser.find_element(By.CSS_SELECTOR, ".column")
        browser.back()  # to the text search, which replaces the image search's columns (as many cards)
        wait.until(ready.staleness_of(image_results))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".column .card")) == 2 * N_IMAGES)
        columns = browser.find_elements(By.CSS_SELECTOR, ".column")

        card = columns[0].find_element(By.CSS_SELECTOR, ".card")
        image_id = int(card.get_attribute("data-id"))
        card.click()
        sentences = [s for c in direct["records"][image_id]["captions"].values() for s in split_sentences(c["long"])]
        shorts = [c["short"] for c in direct["records"][image_id]["captions"].values()]
        expected_texts = list(dict.fromkeys(sentences + shorts))[:32]
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".heatmap")) == len(expected_texts))
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".heatmap .text")] == expected_texts
        canvases = browser.find_elements(By.CSS_SELECTOR, ".heatmap canvas")
        assert len(canvases) == 2 * len(expected_texts)  # one map per model
        assert all((c.get_property("width"), c.get_property("height")) == (4, 4) for c in canvases)  # the patch grid
        # The page paints the server's map, row by row: opacity rises with the weight (40 + 200 w / max).
        first = httpx.get(setup["url"] + "/api/heatmap", params={"id": image_id, "text": expected_texts[0]}, timeout=60).json()
        weights = np.asarray(first["models"][0]["heatmaps"][0]).ravel()
        alpha = browser.execute_script(
            "const c = arguments[0]; return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)"
            ".filter((_, i) => i % 4 === 3);", canvases[0])
        np.testing.assert_allclose(alpha, np.round(40 + 200 * weights / weights.max()), atol=1)
        assert not browser.find_element(By.ID, "results").is_displayed()  # the image page alone
        raw = direct["records"][image_id]["raw_caption"]
        assert raw in browser.find_element(By.ID, "captions").text

        classes = browser.find_element(By.ID, "classes")
        assert "background" in classes.get_attribute("value")  # the collection's own class names
        classes.clear()
        classes.send_keys("background, circle, star, heart")
        browser.find_element(By.CSS_SELECTOR, "#segment-form button").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#segments canvas.labels")) == 2)
        assert len(browser.find_elements(By.CSS_SELECTOR, "#segments .legend li")) == 2 * 4
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, min(height + 200, 2600))
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(screenshots / "serve-image.png"))
        assert not browser.find_element(By.ID, "error").is_displayed()
    finally:
        browser.quit()


def test_an_open_clip_export_serves_like_its_checkpoint(setup, direct, tmp_path):
    from dreamlip.export import export_open_clip

    model, _, _ = direct["models"][0]
    served = load_served_model(export_open_clip(model, NANO, tmp_path / "export"), "export")
    np.testing.assert_allclose(served.encode_image(direct["images"][0]), direct["embeddings"][0][:1].numpy(), atol=1e-5)
    text_emb = served.encode_text("a red star")
    with torch.no_grad():
        expected = model.encode_text(direct["models"][0][2](["a red star"]))
    np.testing.assert_allclose(text_emb, expected.numpy(), atol=1e-5)


def test_bad_command_line_input_is_a_clear_error(tmp_path, capsys):
    from dreamlip.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "model.pt"), "--images", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such directory or file" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt"), "--images", str(tmp_path)]) == 2
    assert "missing.pt: no such checkpoint, export directory or weights file" in capsys.readouterr().err
