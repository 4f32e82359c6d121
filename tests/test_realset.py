"""The real-image development set (``dreamlip demo-data --kind real``): determinism, the label and
mask rules, held-out instances and wording, and the captioners' and alt-text's error rates."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from dreamlip import cli
from demo_data_checks import all_files, read_split, test_queries, training_texts
from dreamlip.captions import split_sentences
from dreamlip.realset import generate, make_record, scenes, sources
from dreamlip.realset.sources import CATEGORIES, DIGIT_WORDS
from dreamlip.realset.text import (
    BACKGROUND_FORMS,
    CAPTIONERS,
    MISNAMES,
    NOUN_FORMS,
    RAW_CAPTION_RATES,
    SLOT_WORDS,
    Scene,
    Thing,
    captioner_captions,
    perceive,
    raw_caption,
)
from dreamlip.synthetic.text import content_words, skeleton

N_TRAIN, N_TEST = 200, 60

_FORM_TO_CATEGORY = {f: c for c, forms in NOUN_FORMS.items() for f in forms}
_DIGIT_REFERENCE = r"handwritten (?:\d|" + "|".join(DIGIT_WORDS) + r")\b"
_CATEGORY_RE = re.compile(
    r"\b(" + _DIGIT_REFERENCE + "|" + "|".join(sorted(map(re.escape, _FORM_TO_CATEGORY), key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def _categories_named(text: str) -> list[str]:
    """The categories a text names, by any of their surface forms ("a handwritten 7" included)."""
    found = []
    for match in _CATEGORY_RE.findall(text):
        form = match.lower()
        found.append(_FORM_TO_CATEGORY.get(form, "handwritten digit"))
    return found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    generate(root, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return root, read_split(root, "train"), read_split(root, "test")


@pytest.fixture(scope="module")
def train_text(data):
    """Every training text a model could see: raw captions, short and long captions, sentences."""
    return training_texts(data[-2])


# ---- layout, determinism --------------------------------------------------------------------


def test_layout_classes_and_meta(data):
    root, train, test = data
    classes = json.loads((root / "classes.json").read_text())
    meta = json.loads((root / "meta.json").read_text())
    assert classes["classification"]["names"] == CATEGORIES
    assert classes["segmentation"]["names"] == ["background"] + CATEGORIES
    assert meta["generator"] == "dreamlip.realset" and meta["n_train"] == N_TRAIN
    assert meta["captioner_error_rates"]["IB"]["miss"] == CAPTIONERS["IB"].p_miss
    assert set(meta["sources"]) == set(sources.SOURCES)
    for split, records in (("train", train), ("test", test)):
        for i, r in enumerate(records):
            assert r["id"] == f"{split}-{i:06d}"
            assert 1 <= len(r["objects"]) <= 3
            assert set(r["captions"]) == set(CAPTIONERS)
            assert ("texts" in r) == (split == "test")
    # every category is the label of some training image
    assert {r["label"] for r in train} == set(range(len(CATEGORIES)))


def test_same_seed_is_byte_identical_whatever_the_workers_and_other_seed_differs(tmp_path):
    generate(tmp_path / "a", n_train=24, n_test=8, seed=5)
    generate(tmp_path / "b", n_train=24, n_test=8, seed=5, workers=2)
    generate(tmp_path / "c", n_train=24, n_test=8, seed=6)
    a, b, c = (all_files(tmp_path / name) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a if k.startswith("images/")) == 32


def test_cli_kind_real_and_the_default_kind_stays_synthetic(tmp_path):
    assert cli.main(["demo-data", str(tmp_path / "real"), "--kind", "real", "--n-train", "6", "--n-test", "2", "--quiet"]) == 0
    assert cli.main(["demo-data", str(tmp_path / "default"), "--n-train", "6", "--n-test", "2", "--quiet"]) == 0
    assert json.loads((tmp_path / "real" / "meta.json").read_text())["generator"] == "dreamlip.realset"
    assert json.loads((tmp_path / "default" / "meta.json").read_text())["generator"] == "dreamlip.synthetic"
    assert len(list((tmp_path / "real" / "masks" / "train").glob("*.png"))) == 6


def test_a_changed_source_file_stops_the_generator_with_one_line(tmp_path, monkeypatch, capsys):
    name = "coins.png"
    monkeypatch.setitem(sources.SOURCES, name, replace(sources.SOURCES[name], sha256="0" * 64))
    assert cli.main(["demo-data", str(tmp_path), "--kind", "real", "--n-train", "2", "--n-test", "1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data/coins.png is not the file" in err
    assert not (tmp_path / "meta.json").exists()


# ---- label and mask rules --------------------------------------------------------------------


def test_label_is_the_largest_visible_object_and_masks_match_the_objects(data):
    root, train, test = data
    for r in train + test:
        mask = np.asarray(Image.open(root / r["mask"]))
        assert mask.shape == (64, 64)
        categories = [o["category"] for o in r["objects"]]
        assert len(set(categories)) == len(categories)  # distinct: the class map is an instance map
        assert set(np.unique(mask).tolist()) <= {0, *(o["mask_value"] for o in r["objects"])}
        for o in r["objects"]:
            assert o["mask_value"] == CATEGORIES.index(o["category"]) + 1
            ys, xs = np.nonzero(mask == o["mask_value"])
            assert len(xs) == o["area"] > 0
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == o["bbox"]
        areas = sorted(((o["area"], o["category"]) for o in r["objects"]), reverse=True)
        assert r["label"] == CATEGORIES.index(areas[0][1])
        if len(areas) > 1:
            assert areas[0][0] >= scenes.MAIN_AREA_RATIO * areas[1][0]


def test_masks_are_exactly_the_pasted_pixels(monkeypatch):
    """With every background replaced by one colour (the same draws, so the same scene), the
    pixels outside the mask are that colour and the ones inside are not, and the objects' pixels
    are the same as over the real background: nothing of the background bleeds into them."""
    records = [make_record(split, i, seed=3) for split in ("train", "test") for i in range(25)]
    magenta = np.array([255, 0, 255], np.uint8)
    flat = {kind: np.broadcast_to(magenta, region.shape).copy() for kind, region in sources.backgrounds().items()}
    monkeypatch.setattr(scenes, "backgrounds", lambda: flat)
    for split, (record, img, seg) in zip(["train"] * 25 + ["test"] * 25, records):
        index = int(record["id"].split("-")[1])
        flat_record, flat_img, flat_seg = make_record(split, index, seed=3)
        assert flat_record == record and np.array_equal(flat_seg, seg)
        is_magenta = (flat_img == magenta).all(-1)
        assert np.array_equal(is_magenta, seg == 0)
        assert np.array_equal(flat_img[seg > 0], img[seg > 0])


def test_test_images_show_coins_and_digits_no_training_image_shows(data):
    _, train, test = data

    def instances(records, category):
        return {o["source"] for r in records for o in r["objects"] if o["category"] == category}

    for category in ("coin", "handwritten digit"):
        seen_in_test = instances(test, category)
        assert seen_in_test and not seen_in_test & instances(train, category)
    assert len(sources.cutouts("test")["coin"]) >= 4 and len(sources.cutouts("train")["coin"]) >= 12


def test_digit_and_facing_attributes_follow_the_cutout(data):
    _, train, _ = data
    import gzip
    import io

    with gzip.open(io.BytesIO(sources._read("digits.csv.gz")), "rt") as f:
        targets = np.loadtxt(f, delimiter=",", dtype=np.int64)[:, 64]
    for o in (o for r in train for o in r["objects"]):
        if o["category"] == "handwritten digit":
            assert o["digit"] == targets[int(o["source"].split("#")[1])]
        elif o["category"] in sources.FACING:  # the source photos face right; a mirrored copy faces left
            assert o["facing"] == ("left" if o["mirrored"] else "right")
        else:
            assert "digit" not in o and "facing" not in o


# ---- text: error models as configured --------------------------------------------------------


def _scene() -> Scene:
    objects = (
        Thing("cat", "large", "top left", None, 10.0, 10.0, 900),
        Thing("handwritten digit", "medium", "center", "seven", 32.0, 32.0, 500),
        Thing("horse", "small", "bottom right", "left", 54.0, 54.0, 200),
    )
    return Scene(objects, "grass", 64)


def _within(count: int, n: int, p: float) -> bool:
    return abs(count / n - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 1e-9


@pytest.mark.parametrize("name", list(CAPTIONERS))
def test_captioner_error_rates_are_the_configured_ones(name):
    spec, scene, n = CAPTIONERS[name], _scene(), 4000
    rng = np.random.default_rng(1)
    truth = {o.category: o for o in scene.objects}
    counts = Counter()
    for _ in range(n):
        seen, background = perceive(scene, spec, rng)
        real = [o for o in seen if not o.hallucinated]
        assert real[0].category == "cat"  # the largest object is never missed
        counts["hallucinated"] += sum(o.hallucinated for o in seen)
        assert all(o.category not in truth for o in seen if o.hallucinated)
        counts["wrong_background"] += background != scene.background
        names = {o.category for o in real}
        counts["missed"] += ("handwritten digit" not in names) + ("horse" not in names)
        for o in real:
            counts["objects"] += 1
            counts["misnamed"] += o.misname is not None
            assert o.misname is None or o.misname in MISNAMES[o.category]
            counts["wrong_size"] += o.size != truth[o.category].size
            counts["wrong_position"] += o.position != truth[o.category].position
            if o.detail is not None:
                counts["details"] += 1
                counts["wrong_detail"] += o.detail != truth[o.category].detail
    assert _within(counts["missed"], 2 * n, spec.p_miss)
    assert _within(counts["hallucinated"], n, spec.p_hallucinate)
    assert _within(counts["wrong_background"], n, spec.p_wrong_background)
    assert _within(counts["misnamed"], counts["objects"], spec.p_misname)
    assert _within(counts["wrong_size"], counts["objects"], spec.p_wrong_size)
    assert _within(counts["wrong_position"], counts["objects"], spec.p_wrong_position)
    assert _within(counts["wrong_detail"], counts["details"], spec.p_wrong_detail)


def test_error_free_captioners_name_exactly_the_scene(monkeypatch):
    from dreamlip.realset import text

    perfect = {name: replace(spec, p_miss=0.0, p_misname=0.0, p_wrong_size=0.0, p_wrong_detail=0.0,
                             p_wrong_position=0.0, p_hallucinate=0.0, p_wrong_background=0.0)
               for name, spec in CAPTIONERS.items()}
    monkeypatch.setattr(text, "CAPTIONERS", perfect)
    rng = np.random.default_rng(2)
    scene = _scene()
    for _ in range(50):
        for name, caption in captioner_captions(scene, list(perfect), rng).items():
            assert set(_categories_named(caption["long"])) == {"cat", "handwritten digit", "horse"}, caption["long"]
            text = (caption["short"] + " " + caption["long"]).lower()
            backgrounds = {kind for kind, forms in BACKGROUND_FORMS.items() if any(f.lower() in text for f in forms)}
            assert backgrounds == {"grass"} or (name == "IB" and not backgrounds), text
            assert not any(w in caption["long"] for w in ("dog", "fox", "tiger", "letter", "deer"))


def test_raw_caption_rates_are_the_configured_ones():
    """Alt-text names nothing, an absent category, another object or the largest at the
    configured rates, and never two categories."""
    scene, n = _scene(), 6000
    rng = np.random.default_rng(3)
    counts = Counter()
    for _ in range(n):
        named = _categories_named(raw_caption(scene, rng))
        assert len(named) <= 1
        if not named:
            counts["nothing"] += 1
        elif named[0] == "cat":
            counts["largest"] += 1
        elif named[0] in ("handwritten digit", "horse"):
            counts["other_object"] += 1
        else:
            counts["absent_object"] += 1
    rates = RAW_CAPTION_RATES
    for key in ("nothing", "other_object", "absent_object"):
        assert _within(counts[key], n, rates[key]), (key, counts)
    assert _within(counts["largest"], n, 1 - rates["nothing"] - rates["other_object"] - rates["absent_object"])


def test_written_captions_are_imperfect_but_informative(data):
    _, train, _ = data
    missing = full = extra = 0
    for r in train:
        present = {o["category"] for o in r["objects"]}
        for c in r["captions"].values():
            named = set(_categories_named(c["long"]))
            missing += bool(present - named)
            full += present <= named
            extra += bool(named - present)
    total = len(train) * len(CAPTIONERS)
    assert 0.03 * total < missing and 0.02 * total < extra  # they miss and hallucinate...
    assert full > 0.6 * total  # ...but usually describe everything there


def test_long_captions_have_4_to_9_sentences(data):
    _, train, test = data
    lengths = Counter()
    for r in train + test:
        for c in r["captions"].values():
            # as written (the sentence splitter keeps "...over the horse. Notably, ..." together)
            n = len(re.findall(r"[.!?](?:\s|$)", c["long"]))
            assert 4 <= n <= 9, c["long"]
            lengths[n] += 1
            assert not re.search(r"[.!?]\s", c["short"]), c["short"]  # one sentence
    assert len(lengths) >= 4


# ---- held-out test text -----------------------------------------------------------------------


def test_human_texts_are_correct_and_varied(data):
    _, _, test = data
    for r in test:
        present = {o["category"] for o in r["objects"]}
        assert 3 <= len(r["texts"]) <= 5 and len(set(r["texts"])) == len(r["texts"])
        for t in r["texts"]:
            named = _categories_named(t)
            assert named and set(named) <= present, (t, present)


def test_test_frames_are_held_out_from_training(data, train_text):
    root, _, test = data
    train_frames = {skeleton(t, SLOT_WORDS) for t in train_text}
    queries = test_queries(root, test)
    clashes = [q for q in queries if skeleton(q, SLOT_WORDS) in train_frames]
    assert not clashes, clashes[:5]
    assert len({skeleton(q, SLOT_WORDS) for q in queries}) > 20
    haystack = "\n".join(t.lower() for t in train_text)
    assert not [q for r in test for q in r["texts"] if q.lower().rstrip(".") in haystack]


def test_test_vocabulary_is_learnable_from_training(data, train_text):
    root, _, test = data
    vocabulary = set().union(*(content_words(t) for t in train_text))
    unseen = Counter(w for q in test_queries(root, test) for w in content_words(q) if w not in vocabulary)
    assert not unseen, unseen


def test_captioner_styles_use_disjoint_frames(data):
    _, train, _ = data
    frames = {name: set() for name in CAPTIONERS}
    for r in train:
        for name, c in r["captions"].items():
            frames[name].update(skeleton(s, SLOT_WORDS) for s in split_sentences(c["long"]))
    names = list(frames)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not frames[a] & frames[b], (a, b, sorted(frames[a] & frames[b])[:3])


def test_the_evaluation_reads_the_set_as_written(data):
    """The eval tasks find the labels, prompts, retrieval texts, long captions and masks."""
    from dreamlip.eval import build_tasks

    root, train, test = data
    tasks = {t.name: t for t in build_tasks(root, ["zeroshot", "retrieval", "long_retrieval", "segmentation"])}
    zeroshot = tasks["zeroshot"].dataset
    assert zeroshot.labels == [r["label"] for r in test] and zeroshot.classnames == CATEGORIES
    assert zeroshot.templates == json.loads((root / "classes.json").read_text())["classification"]["templates"]
    assert tasks["retrieval"].dataset.texts == [r["texts"] for r in test]
    assert tasks["long_retrieval"].dataset.texts == [[c["long"] for c in r["captions"].values()] for r in test]
    segmentation = tasks["segmentation"].dataset
    assert segmentation.classnames == ["background"] + CATEGORIES and segmentation.ignore_index == 255
    assert len(segmentation.masks) == len(test)
