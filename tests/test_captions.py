"""Sentence splitting and sub-caption sampling (METHOD.md, "Sub-caption sampling")."""

import collections
import multiprocessing

import numpy as np
import pytest

from dreamlip.captions import NoUsableTextError, SubcaptionSampler, split_sentences
from dreamlip.config import load_config


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "The dog, e.g. a terrier, sits 3.5 m from Mr. Smith. He lives in the U.S. now.",
            ["The dog, e.g. a terrier, sits 3.5 m from Mr. Smith.", "He lives in the U.S. now."],
        ),
        ("A man rides a bike.</s>A woman walks.", ["A man rides a bike.", "A woman walks."]),
        ("A red car\nA blue sky", ["A red car", "A blue sky"]),
        ("Objects:\n1. A dog.\n2. A cat on a mat.\n- a bird\n• a tree", ["Objects:", "A dog.", "A cat on a mat.", "a bird", "a tree"]),
        ("There are: 1. a dog. 2. a cat.", ["There are:", "a dog.", "a cat."]),
        ("Is it raining? Yes! The sky is grey.", ["Is it raining?", "Yes!", "The sky is grey."]),
        ("  \n\n ... \n</s>", []),
        ("", []),
        ("one sentence without a full stop", ["one sentence without a full stop"]),
    ],
)
def test_split_sentences(text, expected):
    assert split_sentences(text) == expected


def test_split_sentences_accepts_none():
    assert split_sentences(None) == []


CAPTIONS = {
    "IB": {"short": "A dog on grass.", "long": "A brown dog runs. It is on green grass. The sky is blue."},
    "LLA": {"short": "A dog playing outside.", "long": "There is a dog. A ball lies near it."},
}
POOL = [
    "A brown dog runs.", "It is on green grass.", "The sky is blue.", "A dog on grass.",
    "There is a dog.", "A ball lies near it.", "A dog playing outside.",
]


def test_pool_is_long_sentences_plus_short_captions():
    assert sorted(SubcaptionSampler().pool(CAPTIONS)) == sorted(POOL)


def test_pool_variants_for_the_ablation():
    assert sorted(SubcaptionSampler(use_short=False).pool(CAPTIONS)) == sorted(POOL[:3] + POOL[4:6])
    assert SubcaptionSampler(long_mode="whole", use_short=False).pool(CAPTIONS) == [
        "A brown dog runs. It is on green grass. The sky is blue.",
        "There is a dog. A ball lies near it.",
    ]
    assert sorted(SubcaptionSampler(long_mode="none").pool(CAPTIONS)) == ["A dog on grass.", "A dog playing outside."]


def test_sentences_and_whole_long_captions_share_the_pool():
    wholes = ["A brown dog runs. It is on green grass. The sky is blue.", "There is a dog. A ball lies near it."]
    both = SubcaptionSampler(long_mode="sentences+whole").pool(CAPTIONS)
    assert sorted(both) == sorted(POOL + wholes)
    # a long caption of one sentence (or of no more than `merge`) is one pool item, not two equal ones
    one = {"IB": {"long": "Only one sentence here."}, "LLA": {"long": "First one. Second one. Third one."}}
    assert SubcaptionSampler(long_mode="sentences+whole").pool(one) == [
        "Only one sentence here.", "First one.", "Second one.", "Third one.", "First one. Second one. Third one."]
    assert SubcaptionSampler(long_mode="sentences+whole", merge=3).pool(one) == [
        "Only one sentence here.", "First one. Second one. Third one."]
    with pytest.raises(ValueError, match="long_mode must be one of"):
        SubcaptionSampler(long_mode="sentences,whole")


def test_merge_joins_consecutive_sentences():
    pool = SubcaptionSampler(merge=2, use_short=False).pool(CAPTIONS)
    assert pool == ["A brown dog runs. It is on green grass.", "The sky is blue.", "There is a dog. A ball lies near it."]


def test_slot_zero_is_raw_then_k_distinct_pool_items():
    texts = SubcaptionSampler(k=6).sample("alt text here", CAPTIONS, index=3)
    assert len(texts) == 7 and texts[0] == "alt text here"
    assert len(set(texts[1:])) == 6 and set(texts[1:]) <= set(POOL)  # without replacement


def test_small_pool_draws_with_replacement():
    texts = SubcaptionSampler(k=8).sample("alt", CAPTIONS, index=0)
    assert len(texts) == 9 and set(texts[1:]) <= set(POOL)
    assert len(set(texts[1:])) < 8


def test_draws_are_uniform_and_every_item_is_reachable():
    """The released code could never draw a pool's last sentence; every item must come up evenly."""
    sampler = SubcaptionSampler(k=2)
    counts = collections.Counter(t for i in range(7000) for t in sampler.sample("alt", CAPTIONS, index=i)[1:])
    assert set(counts) == set(POOL)
    expected = 7000 * 2 / len(POOL)
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values()), counts


def test_missing_raw_caption_takes_a_pool_item():
    for raw in (None, "", "   ", float("nan"), "..."):
        texts = SubcaptionSampler(k=2).sample(raw, CAPTIONS, index=1)
        assert texts[0] in POOL and len(texts) == 3


def test_no_generated_captions_repeats_the_raw_caption():
    assert SubcaptionSampler(k=3).sample("a cat", {}, index=0) == ["a cat"] * 4


def test_k_zero_is_plain_clip():
    assert SubcaptionSampler(k=0).sample("a cat", CAPTIONS, index=0) == ["a cat"]


def test_no_usable_text_is_reported():
    empty = {"IB": {"short": "", "long": " \n</s> ... "}}
    with pytest.raises(NoUsableTextError):
        SubcaptionSampler(k=4).sample("", empty, index=0)
    with pytest.raises(NoUsableTextError):
        SubcaptionSampler(k=0).sample(None, None, index=0)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="k must"):
        SubcaptionSampler(k=-1)
    with pytest.raises(ValueError, match="merge"):
        SubcaptionSampler(merge=0)
    with pytest.raises(ValueError, match="long_mode"):
        SubcaptionSampler(long_mode="paragraphs")


def test_deterministic_per_seed_epoch_and_index():
    sampler = SubcaptionSampler(k=3, seed=5)
    draw = sampler.sample("alt", CAPTIONS, index=10, epoch=2)
    assert draw == SubcaptionSampler(k=3, seed=5).sample("alt", CAPTIONS, index=10, epoch=2)
    draws = {tuple(sampler.sample("alt", CAPTIONS, index=10, epoch=e)) for e in range(10)}
    assert len(draws) > 5, "a new epoch should redraw the sub-captions"
    others = {tuple(SubcaptionSampler(k=3, seed=s).sample("alt", CAPTIONS, index=10, epoch=2)) for s in range(10)}
    assert len(others) > 5, "the seed should change the draw"


def _draw_in_worker(args):
    seed, epoch, index, sampling = args
    return SubcaptionSampler(k=3, seed=seed, sampling=sampling).sample("alt", CAPTIONS, index=index, epoch=epoch)


def test_same_draw_in_another_process():
    """Dataloader workers and DDP ranks are separate processes: they must reproduce the draw."""
    jobs = [(0, e, i, sampling) for e in range(2) for i in range(20) for sampling in ("subcaptions", "flair")]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        remote = pool.map(_draw_in_worker, jobs)
    assert remote == [_draw_in_worker(job) for job in jobs]


def _flair_reference(pool, k, max_merge, rng):
    """FLAIR's rule written out: each text merges m ~ U{1..max_merge} pool items: one uniform pick,
    or (a fair coin) one of the m-item windows (the whole pool when it has at most m items), or m
    items at random positions (distinct when the pool has m)."""
    texts = []
    for _ in range(k):
        merged = int(rng.integers(1, max_merge + 1))
        if merged == 1:
            pieces = [pool[int(rng.integers(len(pool)))]]
        elif rng.random() < 0.5:
            windows = [pool[start : start + merged] for start in range(len(pool) - merged + 1)] or [list(pool)]
            pieces = windows[int(rng.integers(len(windows)))]
        else:
            pieces = [pool[p] for p in rng.choice(len(pool), size=merged, replace=len(pool) < merged)]
        closed = [piece if piece[-1] in ".!?" else piece + "." for piece in pieces]
        texts.append(" ".join(closed) if len(pieces) > 1 else pieces[0])
    return texts


# FLAIR's pre-split shards: sentences without their periods.
PRESPLIT = {"IB": {"short": "a dog on grass", "long": ["a brown dog runs", "it is on green grass", "the sky is blue"]}}
ONE_ITEM = {"IB": {"short": "", "long": "A lone sentence."}}


@pytest.mark.parametrize("captions", [CAPTIONS, PRESPLIT, ONE_ITEM], ids=["sentences", "presplit", "one-item"])
def test_flair_sampling_equals_a_slow_reference_of_its_rule(captions):
    sampler = SubcaptionSampler(k=4, sampling="flair", seed=3)
    pool = sampler.pool(captions)
    for epoch in range(2):
        for index in range(200):
            texts = sampler.sample("alt", captions, index=index, epoch=epoch)
            assert texts[0] == "alt"
            assert texts[1:] == _flair_reference(pool, 4, 3, np.random.default_rng((3, epoch, index))), (epoch, index)


def test_flair_sampling_merges_one_to_three_items_consecutive_or_at_random():
    """Every slot is 1..3 pool items, each sentence of it a pool item; a merge is a window of the
    pool or items at random positions, the last window and out-of-order merges included; and the
    merge sizes come up evenly (m ~ U{1..3})."""
    sampler = SubcaptionSampler(k=2, sampling="flair")
    sizes, windows, shuffled = collections.Counter(), collections.Counter(), 0
    for index in range(3000):
        for text in sampler.sample("alt", CAPTIONS, index=index)[1:]:
            positions = [POOL_ORDER.index(sentence) for sentence in split_sentences(text)]
            sizes[len(positions)] += 1
            if len(positions) > 1:
                assert len(set(positions)) == len(positions), text  # 7 items: random picks are distinct
                if positions == list(range(positions[0], positions[0] + len(positions))):
                    windows[positions[0], len(positions)] += 1
                else:
                    shuffled += positions != sorted(positions)
    assert set(sizes) == {1, 2, 3} and all(abs(c - 2000) < 150 for c in sizes.values()), sizes
    assert (len(POOL) - 3, 3) in windows and (len(POOL) - 2, 2) in windows  # the last windows too
    assert shuffled > 500


POOL_ORDER = SubcaptionSampler().pool(CAPTIONS)


def test_flair_sampling_is_the_flair_variants_and_refuses_merge():
    assert load_config(variant="flair").captions.sampling == "flair"
    assert load_config(variant="dreamlip").captions.sampling == "subcaptions"
    with pytest.raises(ValueError, match="merge=2 with sampling='flair'"):
        SubcaptionSampler(sampling="flair", merge=2)
    with pytest.raises(ValueError, match="sampling must be one of"):
        SubcaptionSampler(sampling="sentences")
    with pytest.raises(ValueError, match="max_merge must be >= 1"):
        SubcaptionSampler(sampling="flair", max_merge=0)
