"""build_train_loader end to end: bad data, reader equivalence, epochs, resume, ranks, mixing."""

import json
import re
from collections import Counter
from itertools import chain

import numpy as np
import pytest
import torch
from data_fixtures import IMAGE_SIZE, bad_corpus, good_corpus, tokenizer

from dreamlip.captions import SubcaptionSampler
from dreamlip.cli import main
from dreamlip.data import loader as loader_module
from dreamlip.data.loader import DistributedBatchSampler, NoUsableSamples, build_train_loader
from dreamlip.data.records import SchemaError, read_jsonl
from dreamlip.data.shards import write_shards
from dreamlip.data.spec import SpecError

SAMPLER = SubcaptionSampler(k=3, seed=5)


def build(spec, **kw):
    kw.setdefault("batch_size", 4)
    return build_train_loader(spec, sampler=SAMPLER, tokenizer=tokenizer(), image_size=IMAGE_SIZE, **kw)


def by_key(batches):
    """key -> (image tensor, texts) over an epoch; keys must not repeat."""
    out = {}
    for batch in batches:
        for i, key in enumerate(batch["keys"]):
            assert key not in out
            out[key] = (batch["images"][i], batch["raw_texts"][i])
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    corpus = bad_corpus(tmp_path_factory.mktemp("bad"))
    jsonl, csv = corpus.write_jsonl(), corpus.write_csv()
    table = read_jsonl(jsonl)
    # two shards, one per half (see bad_corpus), each ending with a good sample
    write_shards((table[i] for i in range(13)), str(corpus.root / "a-%d.tar"))
    write_shards((table[i] for i in range(13, len(table))), str(corpus.root / "b-%d.tar"))
    specs = {"jsonl": str(jsonl), "csv": str(csv), "wds": f"wds:{corpus.root}/a-0.tar::{corpus.root}/b-0.tar"}
    return corpus, specs


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("reader", ["jsonl", "csv", "wds"])
def test_bad_corpus_is_skipped_and_counted(bad, reader, num_workers):
    corpus, specs = bad
    if reader == "wds":  # stream: exactly the 16 good samples; order kept so every bad one is met
        loader = build(specs[reader], num_workers=num_workers, epoch_samples=16, shuffle_buffer=1)
    else:  # map: 25 records in 5 batches of 5, every record visited once
        loader = build(specs[reader], num_workers=num_workers, batch_size=5)
    batches = list(loader)
    assert len(batches) == len(loader) == loader.num_batches
    size = batches[0]["images"].shape[0]
    for batch in batches:  # fixed shapes, whatever was skipped
        assert (
            batch["images"].shape == (size, 3, IMAGE_SIZE, IMAGE_SIZE)
            and batch["images"].dtype == torch.float32
        )
        assert batch["texts"].shape == (size, 4, 77) and batch["texts"].dtype == torch.long
    skips = Counter()
    for batch in batches:
        skips.update(batch["skips"])
    assert dict(skips) == corpus.expected_skips
    keys = [key for batch in batches for key in batch["keys"]]
    assert set(keys) == set(corpus.good_ids)  # every good sample, including the odd image modes


def test_schema_error_is_raised_at_build_with_file_line_field(tmp_path):
    corpus = good_corpus(tmp_path, 4)
    records = [dict(r) for r in corpus.records]
    records[2]["captions"] = {"IB": {"long": ["a sentence", 3]}}
    path = corpus.write_jsonl("broken.jsonl", records)
    with pytest.raises(SchemaError, match=rf"^{path}:3: field 'captions.IB.long': expected str, got list$"):
        build(f"{path},{corpus.write_jsonl()}")


def _all_bad(tmp_path):
    """8 records: 6 name missing images, 2 have no text."""
    records = [{"image": f"x{i}.png", "raw_caption": "a"} for i in range(6)]
    records += [{"image": f"y{i}.png", "raw_caption": ""} for i in range(2)]
    path = tmp_path / "gone.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("num_workers", [0, 1])
def test_all_bad_data_stops_with_the_counts_and_the_first_records(tmp_path, num_workers):
    loader = build(str(_all_bad(tmp_path)), num_workers=num_workers)
    with pytest.raises(NoUsableSamples) as info:
        next(iter(loader))
    message = str(info.value)  # the worker's message, not its traceback
    assert message.startswith("no usable sample: the 8 records tried in a row were all bad ")
    assert "(missing_image 6, no_text 2)" in message and "Traceback" not in message
    examples = [line.strip() for line in message.splitlines()[1:-1]]
    patterns = [
        rf"record 00000000[0-5]: missing_image: {tmp_path}/x[0-5].png: No such file",  # path named once
        r"record 00000000[67] \(.*y[01].png\): no_text",
    ]
    assert len(examples) == 5 and all(any(re.match(p, e) for p in patterns) for e in examples), examples


def test_all_bad_stream_stops_with_the_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(loader_module, "MAX_CONSECUTIVE_BAD", 50)  # inherited by forked workers
    table = read_jsonl(_all_bad(tmp_path))
    write_shards((table[i] for i in range(len(table))), str(tmp_path / "s-%d.tar"))
    loader = build(f"wds:{tmp_path}/s-0.tar", num_workers=1, epoch_samples=8)
    with pytest.raises(NoUsableSamples, match=r"the 50 records tried in a row were all bad \(") as info:
        next(iter(loader))
    assert "Traceback" not in str(info.value) and "missing_image" in str(info.value)


def test_all_bad_data_is_one_message_from_the_cli(tmp_path, capsys):
    args = ["train", "--data", str(_all_bad(tmp_path)), "--out", str(tmp_path / "run")]
    settings = ["model.name=DreamLIP-ViT-Nano-32", "data.workers=1", "optim.batch_size=4", "run.progress=false"]
    assert main([*args, *(x for s in settings for x in ("--set", s))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dreamlip train: error: no usable sample: the 8 records tried in a row were all bad")
    assert "Traceback" not in err and "DataLoader worker" not in err


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    corpus = good_corpus(tmp_path_factory.mktemp("good"), 12)
    jsonl = corpus.write_jsonl()
    write_shards(read_jsonl(jsonl), str(corpus.root / "s-%d.tar"), maxcount=3)
    return corpus, {
        "jsonl": str(jsonl),
        "csv": str(corpus.write_csv()),
        "wds": f"{corpus.root}/s-{{0..3}}.tar",
    }


def test_readers_yield_identical_samples(good):
    corpus, specs = good
    epochs = {reader: by_key(build(spec, epoch=2)) for reader, spec in specs.items()}
    reference = epochs["jsonl"]
    assert sorted(reference) == sorted(corpus.good_ids)
    for reader in ("csv", "wds"):
        assert sorted(epochs[reader]) == sorted(reference)
        for key, (image, texts) in reference.items():
            assert torch.equal(epochs[reader][key][0], image), (reader, key)
            assert epochs[reader][key][1] == texts, (reader, key)


@pytest.mark.parametrize("reader", ["jsonl", "wds"])
def test_epoch_reaches_persistent_workers_and_changes_texts(good, reader):
    _, specs = good
    # batch 3: each of 2 workers makes 2 batches, exactly its 2 shards of 3 samples
    loader = build(specs[reader], num_workers=2, batch_size=3)
    epoch0 = by_key(loader)
    loader.set_epoch(1)
    epoch1 = by_key(loader)
    assert epoch0.keys() == epoch1.keys()
    reference = by_key(build(specs[reader], epoch=1, num_workers=0, batch_size=3))
    for key, (image, texts) in epoch1.items():
        assert texts == reference[key][1] and torch.equal(image, reference[key][0])
    changed_texts = sum(epoch0[k][1] != texts for k, (_, texts) in epoch1.items())
    changed_images = sum(not torch.equal(epoch0[k][0], image) for k, (image, _) in epoch1.items())
    assert changed_texts >= 6 and changed_images >= 6  # new sub-captions and new augmentation
    assert all(texts[0] == epoch0[k][1][0] for k, (_, texts) in epoch1.items())  # slot 0: raw caption


def test_stream_resume_and_unknown_size(good, tmp_path):
    corpus, _ = good
    write_shards(read_jsonl(corpus.write_jsonl()), str(tmp_path / "s-%d.tar"), maxcount=6)
    (tmp_path / "sizes.json").unlink()
    spec = f"{tmp_path}/s-{{0..1}}.tar"
    with pytest.raises(SpecError, match=r"add \?samples=N"):
        build(spec)
    loader = build(spec + "?samples=12", batch_size=2, start_batch=4)
    assert loader.num_batches == 6 and len(loader) == len(list(loader)) == 2
    loader.set_epoch(1)
    assert len(list(loader)) == 6


def test_resume_mid_epoch_reproduces_the_rest_exactly(good):
    _, specs = good
    full = list(build(specs["jsonl"], batch_size=2, epoch=3))
    resumed_loader = build(specs["jsonl"], batch_size=2, epoch=3, start_batch=4)
    assert len(resumed_loader) == len(full) - 4
    live = build(specs["jsonl"], batch_size=2, num_workers=2)
    list(live)  # start its persistent workers on epoch 0
    for loader in (resumed_loader, live):
        loader.set_epoch(3, start_batch=4)
        rest = list(loader)
        assert len(rest) == len(full) - 4
        for expected, got in zip(full[4:], rest, strict=True):
            assert expected["keys"] == got["keys"]
            assert torch.equal(expected["texts"], got["texts"]) and torch.equal(
                expected["images"], got["images"]
            )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_resume_mid_epoch_replays_exactly(bad, tmp_path, num_workers):
    """Bad samples, a shuffle buffer and a second source mixed in: resuming from the reported
    counts gives the uninterrupted epoch's remaining batches, skip counts included."""
    corpus, specs = bad
    spec = f"{specs['wds']}:0.6,{good_corpus(tmp_path, 8, prefix='m').write_jsonl()}:0.4"
    options = dict(num_workers=num_workers, batch_size=3, epoch_samples=36, shuffle_buffer=4, epoch=2)
    loader = build(spec, **options)
    full, counts = [], []
    for batch in loader:
        full.append(batch)
        counts.append(list(loader.records_read))
    assert len(full) == 12 and sum(sum(b["skips"].values()) for b in full) > 0
    for start in (1, 5, 8):
        resumed = list(build(spec, **options, start_batch=start, records_read=counts[start - 1]))
        assert len(resumed) == len(full) - start
        for expected, got in zip(full[start:], resumed, strict=True):
            assert expected["keys"] == got["keys"] and expected["skips"] == got["skips"]
            assert torch.equal(expected["images"], got["images"]) and torch.equal(expected["texts"], got["texts"])
    # without the counts the rest of the epoch is a fresh draw of the right length
    fresh = list(build(spec, **options, start_batch=5))
    assert len(fresh) == 7 and [b["keys"] for b in fresh] != [b["keys"] for b in full[5:]]


def test_ranks_split_the_epoch(good):
    _, specs = good
    per_rank = [
        [k for b in build(specs["jsonl"], batch_size=2, rank=r, world_size=3) for k in b["keys"]]
        for r in range(3)
    ]
    assert [len(keys) for keys in per_rank] == [4, 4, 4]
    assert sorted(chain.from_iterable(per_rank)) == sorted(good[0].good_ids)


def test_stream_split_over_ranks_and_workers_covers_shards_once(tmp_path):
    corpus = good_corpus(tmp_path, 24)
    write_shards(read_jsonl(corpus.write_jsonl()), str(tmp_path / "s-%d.tar"), maxcount=6)
    spec = f"{tmp_path}/s-{{0..3}}.tar"
    keys = []
    for rank in range(2):
        loader = build(spec, batch_size=3, rank=rank, world_size=2, num_workers=2)
        assert len(loader) == 4 and loader.num_samples == 24
        keys += [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(corpus.good_ids)
    with pytest.raises(ValueError, match="4 shards can't be split over 3 ranks x 2 workers"):
        build(spec, batch_size=3, world_size=3, num_workers=2)


def test_stream_mix_follows_weights(tmp_path):
    a = good_corpus(tmp_path / "a", 20, prefix="a")
    b = good_corpus(tmp_path / "b", 20, prefix="b")
    write_shards(read_jsonl(b.write_jsonl()), str(tmp_path / "b" / "s-%d.tar"), maxcount=10)
    loader = build(
        f"{a.write_jsonl()}:0.7,wds:{tmp_path}/b/s-{{0..1}}.tar:0.3", batch_size=20, epoch_samples=600
    )
    assert loader.mode == "stream" and len(loader) == 30
    sources = Counter(key[0] for batch in loader for key in batch["keys"])
    # binomial(600, 0.7): sd 11 samples; allow about 3.3 sd
    assert abs(sources["a"] - 420) <= 36 and sources["a"] + sources["b"] == 600


def test_map_mix_is_exact_per_epoch(tmp_path):
    a = good_corpus(tmp_path / "a", 10, prefix="a")
    b = good_corpus(tmp_path / "b", 30, prefix="b")
    loader = build(f"{a.write_jsonl()}:1,{b.write_jsonl()}:1", batch_size=5)
    assert loader.mode == "map" and len(loader) == 8
    keys = [k for batch in loader for k in batch["keys"]]
    counts = Counter(k[0] for k in keys)
    assert counts == {"a": 20, "b": 20}
    assert Counter(k for k in keys if k[0] == "a") == {k: 2 for k in a.good_ids}  # a is cycled, each twice


def test_batch_sampler_ranks_disjoint_covering_equal():
    sizes, batch, world = [15, 9], 3, 4  # 24 samples = 2 global batches of 12
    samplers = [DistributedBatchSampler(sizes, batch, rank=r, world_size=world, seed=1) for r in range(world)]
    per_rank = [[i for b in s for _, i in b] for s in samplers]
    assert all(len(indices) == 6 for indices in per_rank)
    assert sorted(chain.from_iterable(per_rank)) == list(range(24))
    # drop_last: 25 samples still give 2 global batches, and ranks stay equal
    uneven = [DistributedBatchSampler([25], batch, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in uneven} == {2} and len({i for s in uneven for b in s for _, i in b}) == 24


def test_batch_sampler_resume_and_epochs():
    sampler = DistributedBatchSampler([50], 4, rank=1, world_size=2, seed=7)
    sampler.set_epoch(5)
    full = list(sampler)
    assert len(full) == 6 and all(epoch == 5 for b in full for epoch, _ in b)
    for start in range(len(full) + 1):
        sampler.set_epoch(5, start_batch=start)
        assert list(sampler) == full[start:] and len(sampler) == len(full) - start
    sampler.set_epoch(6)
    assert [i for b in sampler for _, i in b] != [i for b in full for _, i in b]
    again = DistributedBatchSampler([50], 4, rank=1, world_size=2, seed=7)
    again.set_epoch(5)
    assert list(again) == full
    with pytest.raises(ValueError, match=r"start_batch 7 outside 0\.\.6"):
        sampler.set_epoch(5, start_batch=7)


def test_batch_sampler_weights_exact_counts():
    sampler = DistributedBatchSampler([100, 1000], 10, weights=[0.7, 0.3], epoch_samples=1000)
    order = sampler.epoch_order()
    from_first = int((order < 100).sum())
    assert from_first == 700
    assert np.all(np.bincount(order[order < 100], minlength=100) == 7)  # seven full passes, no favourites
    assert len(set(order[order >= 100].tolist())) == 300  # the rest: 300 distinct, without replacement


def test_batch_sampler_refuses_too_small_epoch():
    with pytest.raises(ValueError, match="less than one global batch"):
        DistributedBatchSampler([5], 4, world_size=2)


def test_cached_tokenizer_matches_the_tokenizer_and_stays_bounded():
    from dreamlip.data.loader import CachedTokenizer

    calls = []

    def counting(texts):
        calls.append(list(texts))
        return tokenizer()(texts)

    cached = CachedTokenizer(counting, max_entries=3)
    texts = ["a red circle.", "a blue square.", "a red circle.", "a green star on the left."]
    torch.testing.assert_close(cached(texts), tokenizer()(texts), rtol=0, atol=0)
    assert calls == [["a red circle.", "a blue square.", "a green star on the left."]]  # each text once
    assert cached(["a red circle."]).shape == (1, 77) and len(calls) == 1  # served from the cache
    cached(["a small triangle."])  # a fourth text: the least recently used ("a blue square.") goes
    assert len(cached._rows) == 3 and "a blue square." not in cached._rows
    torch.testing.assert_close(cached(texts), tokenizer()(texts), rtol=0, atol=0)
    assert calls[-1] == ["a blue square."]


@pytest.mark.parametrize(
    "content, name", [("", "empty.jsonl"), ("\n\n", "blank.jsonl"), ("image,raw_caption\n", "header.csv")]
)
def test_a_source_without_records_is_refused_naming_the_file(tmp_path, content, name):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SchemaError, match=rf"^{path}: holds no records$"):
        build(str(path))
