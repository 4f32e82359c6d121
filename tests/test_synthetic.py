"""The embedded synthetic dataset: layout, determinism, masks, and the train/test text separation."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dreamlip import cli
from demo_data_checks import all_files, read_split, test_queries, training_texts
from dreamlip.captions import split_sentences
from dreamlip.synthetic import generate
from dreamlip.synthetic.text import (
    CAPTIONERS,
    SHAPE_FORMS,
    SHAPES,
    content_words,
    skeleton,
)

N_TRAIN, N_TEST = 300, 60

_SHAPE_RE = re.compile(
    r"\b(" + "|".join(sorted({re.escape(f) for fs in SHAPE_FORMS.values() for f in fs},
                             key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)
_FORM_TO_SHAPE = {f: s for s, fs in SHAPE_FORMS.items() for f in fs}


def _shape_mentions(text: str) -> list[str]:
    return [_FORM_TO_SHAPE[m.lower()] for m in _SHAPE_RE.findall(text)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    summary = generate(root, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return root, summary, read_split(root, "train"), read_split(root, "test")


@pytest.fixture(scope="module")
def train_text(data):
    """Every training text a model could see: raw captions, short captions, long captions whole
    and split into sentences."""
    return training_texts(data[-2])


# ---- layout ---------------------------------------------------------------------------------


def test_layout_and_schema(data):
    root, summary, train, test = data
    assert summary["n_train"] == N_TRAIN and summary["n_test"] == N_TEST
    assert len(train) == N_TRAIN and len(test) == N_TEST
    classes = json.loads((root / "classes.json").read_text())
    meta = json.loads((root / "meta.json").read_text())
    assert classes["classification"]["names"] == SHAPES
    assert all("{}" in t for t in classes["classification"]["templates"])
    assert classes["segmentation"]["names"] == ["background"] + SHAPES
    assert classes["segmentation"]["ignore_index"] == 255
    assert meta["seed"] == 0 and meta["image_size"] == 64
    assert meta["captioners"] == list(CAPTIONERS) and len(meta["captioners"]) >= 2
    for split, records in (("train", train), ("test", test)):
        for i, r in enumerate(records):
            assert r["id"] == f"{split}-{i:06d}"
            assert (root / r["image"]).is_file() and (root / r["mask"]).is_file()
            assert set(r["captions"]) == set(CAPTIONERS)
            assert all(c["short"] and c["long"] for c in r["captions"].values())
            assert 2 <= len(r["objects"]) <= 4
            # the label is the shape with the most visible pixels (mask value = shape index + 1)
            values, counts = np.unique(np.asarray(Image.open(root / r["mask"])), return_counts=True)
            largest = values[(values > 0) & (counts == counts[values > 0].max())]
            assert r["label"] + 1 in largest and SHAPES[r["label"]] in {o["shape"] for o in r["objects"]}
            assert ("texts" in r) == (split == "test")
    for r in test:
        assert 3 <= len(r["texts"]) <= 5 and len(set(r["texts"])) == len(r["texts"])


def test_cli_writesall_files(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["demo-data", str(out), "--n-train", "50", "--n-test", "10", "--quiet"]) == 0
    for name in ("train.jsonl", "test.jsonl", "classes.json", "meta.json"):
        assert (out / name).is_file()
    assert len(read_split(out, "train")) == 50 and len(read_split(out, "test")) == 10
    assert len(list((out / "images" / "train").glob("*.png"))) == 50
    assert len(list((out / "masks" / "test").glob("*.png"))) == 10


def test_image_size_option(tmp_path):
    generate(tmp_path, n_train=4, n_test=2, image_size=96, seed=3)
    r = read_split(tmp_path, "train")[0]
    assert Image.open(tmp_path / r["image"]).size == (96, 96)
    assert np.asarray(Image.open(tmp_path / r["mask"])).shape == (96, 96)


# ---- determinism ----------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, n_train=30, n_test=8, seed=7)
    generate(b, n_train=30, n_test=8, seed=7)
    generate(c, n_train=30, n_test=8, seed=8)
    fa, fb, fc = all_files(a), all_files(b), all_files(c)
    assert fa == fb
    assert fa.keys() == fc.keys()
    assert fa["train.jsonl"] != fc["train.jsonl"] and fa["test.jsonl"] != fc["test.jsonl"]
    differing = [k for k in fa if k.startswith("images/") and fa[k] != fc[k]]
    assert len(differing) == 38


def test_worker_processes_do_not_change_output(tmp_path):
    generate(tmp_path / "one", n_train=20, n_test=6, seed=1, workers=1)
    generate(tmp_path / "two", n_train=20, n_test=6, seed=1, workers=2)
    assert all_files(tmp_path / "one") == all_files(tmp_path / "two")


def _generate_reusing(root: str, seed: int) -> bool:
    return generate(root, n_train=40, n_test=8, seed=seed, reuse=True)["reused"]


def test_reuse_keeps_a_matching_set_and_rewrites_any_other(tmp_path):
    first = generate(tmp_path, n_train=12, n_test=4, seed=2)
    edited = tmp_path / "images" / "train" / "000000.png"
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and p != edited}
    edited.write_bytes(b"edited")  # shows whether it is rewritten
    again = generate(tmp_path, n_train=12, n_test=4, seed=2, reuse=True)
    assert not first["reused"] and again["reused"]
    assert edited.read_bytes() == b"edited"
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    generate(tmp_path / "reference", n_train=12, n_test=4, seed=3)
    assert not generate(tmp_path, n_train=12, n_test=4, seed=3, reuse=True)["reused"]  # other seed: rewritten
    assert {k: v for k, v in all_files(tmp_path).items() if not k.startswith("reference")} == {
        k: v for k, v in all_files(tmp_path / "reference").items()}


def test_reuse_rewrites_a_set_whose_writer_was_killed(tmp_path):
    generate(tmp_path / "reference", n_train=10, n_test=3, seed=1)
    generate(tmp_path / "set", n_train=10, n_test=3, seed=1)
    (tmp_path / "set" / "meta.json").unlink()  # written last: a set without it is incomplete
    (tmp_path / "set" / "masks" / "test" / "000002.png").write_bytes(b"half")
    assert not generate(tmp_path / "set", n_train=10, n_test=3, seed=1, reuse=True)["reused"]
    assert all_files(tmp_path / "set") == all_files(tmp_path / "reference")


def test_concurrent_writers_take_turns_and_the_second_reuses(tmp_path):
    import multiprocessing as mp

    generate(tmp_path / "reference", n_train=40, n_test=8, seed=5)
    generate(tmp_path / "set", n_train=40, n_test=8, seed=4)  # another set there: both must replace it
    with mp.get_context("fork").Pool(2) as pool:
        reused = pool.starmap(_generate_reusing, [(str(tmp_path / "set"), 5)] * 2)
    assert sorted(reused) == [False, True]
    assert all_files(tmp_path / "set") == all_files(tmp_path / "reference")


# ---- images and masks -----------------------------------------------------------------------


def test_masks_agree_with_objects_and_label(data):
    root, _, train, test = data
    for r in train + test:
        img = np.asarray(Image.open(root / r["image"]))
        mask = np.asarray(Image.open(root / r["mask"]))
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        values = [o["mask_value"] for o in r["objects"]]
        assert len(set(values)) == len(values)  # distinct shapes: the class map is an instance map
        assert set(np.unique(mask).tolist()) <= {0, *values}
        for o in r["objects"]:
            assert o["mask_value"] == SHAPES.index(o["shape"]) + 1
            ys, xs = np.nonzero(mask == o["mask_value"])
            assert len(xs) == o["area"] > 0
            x0, y0, x1, y1 = o["bbox"]
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x0, y0, x1, y1]
        areas = sorted((o["area"], o["shape"]) for o in r["objects"])
        assert r["label"] == SHAPES.index(areas[-1][1])
        assert areas[-1][0] > areas[-2][0]  # the label object is unambiguous
        # the object's pixels carry its colour family, not the background: not all one value
        assert img[mask > 0].std() > 0


def test_objects_are_visibly_coloured(data):
    """An object's pixels differ from the background around it (it is actually drawn)."""
    root, _, train, _ = data
    for r in train[:50]:
        img = np.asarray(Image.open(root / r["image"])).astype(float)
        mask = np.asarray(Image.open(root / r["mask"]))
        bg = img[mask == 0].mean(axis=0)
        for o in r["objects"]:
            obj = img[mask == o["mask_value"]].mean(axis=0)
            assert np.abs(obj - bg).max() > 25


def test_shapes_take_their_typical_colour_at_the_set_rate(monkeypatch):
    """The first object always finds its typical colour free, so it takes it with probability
    TYPICAL_COLOR_P exactly; colours stay distinct; with the rate at 0 the typical colour is only
    as frequent as any other (1/8)."""
    from dreamlip.synthetic import scenes

    def typical_rate(p: float, n: int = 4000) -> float:
        monkeypatch.setattr(scenes, "TYPICAL_COLOR_P", p)
        rng = np.random.default_rng(0)
        hits = 0
        for _ in range(n):
            shapes = rng.choice(len(SHAPES), size=4, replace=False)
            colors = scenes._draw_colors(shapes, rng)
            assert len(set(colors)) == 4
            hits += scenes.COLORS[colors[0]] == scenes.TYPICAL_COLOR[SHAPES[shapes[0]]]
        return hits / n

    for p in (0.0, 0.6, 1.0):
        expected = p + (1 - p) / len(scenes.COLORS)  # a free draw can land on it too
        assert abs(typical_rate(p) - expected) < 4 * (expected * (1 - expected) / 4000) ** 0.5 + 1e-9
    assert sorted(scenes.TYPICAL_COLOR) == sorted(SHAPES)
    assert sorted(scenes.TYPICAL_COLOR.values()) == sorted(scenes.COLORS)


def test_generated_labels_follow_the_typical_colour(data):
    """In the written set the labelled object wears its shape's typical colour far more often
    than the 1/8 a shape-blind colour draw gives, and far from always."""
    from dreamlip.synthetic import scenes

    _, _, train, _ = data
    main = [max(r["objects"], key=lambda o: o["area"]) for r in train]
    rate = sum(o["color"] == scenes.TYPICAL_COLOR[o["shape"]] for o in main) / len(main)
    assert 0.4 < rate < 0.8


# ---- captions -------------------------------------------------------------------------------


def test_long_captions_have_4_to_9_sentences(data):
    _, _, train, test = data
    counts = Counter()
    for r in train + test:
        for c in r["captions"].values():
            n = len(split_sentences(c["long"]))
            assert 4 <= n <= 9, c["long"]
            counts[n] += 1
            assert len(split_sentences(c["short"])) == 1
    assert len(counts) >= 5  # lengths vary


def test_raw_captions_are_thin(data):
    _, _, train, _ = data
    mentions = [_shape_mentions(r["raw_caption"]) for r in train]
    assert all(len(m) <= 1 for m in mentions)
    # Mostly the main object, sometimes another, sometimes nothing at all.
    main = sum(1 for r, m in zip(train, mentions) if m and m[0] == SHAPES[r["label"]])
    none = sum(1 for m in mentions if not m)
    assert 0.5 < main / len(train) < 0.9
    assert 0.03 < none / len(train) < 0.25


def test_captioners_are_imperfect_but_informative(data):
    _, _, train, _ = data
    n_missing = n_full = 0
    for r in train:
        shapes = {o["shape"] for o in r["objects"]}
        for c in r["captions"].values():
            said = set(_shape_mentions(c["long"]))
            n_missing += bool(shapes - said)
            n_full += shapes <= said
    total = len(train) * len(CAPTIONERS)
    assert n_missing > 0.03 * total  # captioners miss objects...
    assert n_full > 0.6 * total  # ...but usually describe all of them


def test_captioner_styles_differ(data):
    _, _, train, _ = data
    frames = {name: set() for name in CAPTIONERS}
    for r in train:
        for name, c in r["captions"].items():
            frames[name].update(skeleton(s) for s in split_sentences(c["long"]))
    names = list(frames)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            assert not frames[names[i]] & frames[names[j]], (names[i], names[j])


def test_human_texts_are_correct(data):
    _, _, _, test = data
    for r in test:
        shapes = {o["shape"] for o in r["objects"]}
        for t in r["texts"]:
            said = _shape_mentions(t)
            assert said and set(said) <= shapes, (t, shapes)


# ---- held-out test style --------------------------------------------------------------------


def test_test_texts_never_appear_in_training_text(data, train_text):
    root, _, _, test = data
    haystack = "\n".join(t.lower() for t in train_text)
    for q in (t for r in test for t in r["texts"]):
        assert q.lower().rstrip(".") not in haystack, q


def test_test_sentence_frames_absent_from_training(data, train_text):
    root, _, _, test = data
    train_frames = {skeleton(t) for t in train_text}
    queries = test_queries(root, test)
    clashes = [q for q in queries if skeleton(q) in train_frames]
    assert not clashes, clashes[:5]
    # and the test style is not one frame: several distinct ones are used
    assert len({skeleton(q) for q in queries}) > 20


def test_test_vocabulary_is_learnable_from_training(data, train_text):
    root, _, _, test = data
    vocab = set().union(*(content_words(t) for t in train_text))
    classes = json.loads((root / "classes.json").read_text())
    queries = test_queries(root, test) + classes["segmentation"]["names"]
    unseen = Counter(w for q in queries for w in content_words(q) if w not in vocab)
    assert not unseen, unseen


def test_skeleton_helper():
    assert skeleton("A big red star next to a small blue ring.") == "a # to a #"
    assert skeleton("There is a large cyan circle at the top left.") == "there is a # at the #"
    assert content_words("A red star next to the ring") == {"red", "star", "next", "ring"}
