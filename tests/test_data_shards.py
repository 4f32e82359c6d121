"""Webdataset shards: writing, the start-up schema check, and splitting/resampling across readers."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from data_fixtures import good_corpus

from dreamlip.data.records import SchemaError, read_jsonl
from dreamlip.data.shards import ShardSource, write_shards


def _keys(source, **where):
    """Record keys one reader gets for one epoch's first ``n`` records."""
    n = where.pop("n")
    stream = source.records(seed=0, shuffle_buffer=4, **where)
    return [next(stream).key for _ in range(n)]


def test_write_shards_splits_and_records_sizes(tmp_path):
    corpus = good_corpus(tmp_path, 7)
    corpus.records[0]["id"] = "has.dots/and slashes"
    paths = write_shards(
        read_jsonl(corpus.write_jsonl()), str(tmp_path / "out" / "part-%03d.tar"), maxcount=3
    )
    assert [p.rsplit("/", 1)[1] for p in paths] == ["part-000.tar", "part-001.tar", "part-002.tar"]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {
        "part-000.tar": 3,
        "part-001.tar": 3,
        "part-002.tar": 1,
    }
    source = ShardSource.open(str(tmp_path / "out" / "part-{000..002}.tar"))
    assert source.size == 7
    first = _keys(source, epoch=0, rank=0, world_size=1, worker=0, num_workers=1, n=7)
    assert sorted(first) == sorted(r["id"] for r in corpus.records)
    with pytest.raises(ValueError, match="needs one %-placeholder"):
        write_shards([], str(tmp_path / "x.tar"))


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_wrong_shard_layout_is_refused_at_start(tmp_path):
    _tar(tmp_path / "image-only.tar", {"000.jpg": b"x", "000.cls": b"3"})
    with pytest.raises(
        SchemaError, match=r"image-only\.tar \(sample '000'\): no \.json or \.txt member \(members: jpg, cls\)"
    ):
        ShardSource.open(str(tmp_path / "image-only.tar"))
    _tar(tmp_path / "field.tar", {"000.jpg": b"x", "000.json": json.dumps({"url": "http://a/b.jpg"}).encode()})
    with pytest.raises(SchemaError, match=r"field\.tar \(sample '000'\): field 'raw_caption': missing: no caption"):
        ShardSource.open(str(tmp_path / "field.tar"))
    (tmp_path / "garbage.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(SchemaError, match=r"garbage\.tar: can't read shard"):
        ShardSource.open(str(tmp_path / "garbage.tar"))
    with pytest.raises(FileNotFoundError, match=r"1 of 2 shards .* not found"):
        ShardSource.open(str(tmp_path / "{image-only,nope}.tar"))


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    corpus = good_corpus(root, 24)
    write_shards(read_jsonl(corpus.write_jsonl()), str(root / "s-%02d.tar"), maxcount=6)
    return str(root / "s-{00..03}.tar"), corpus


def test_split_gives_each_reader_distinct_shards(four_shards):
    pattern, corpus = four_shards
    source = ShardSource.open(pattern)
    seen = []
    for rank in range(2):
        for worker in range(2):
            seen += _keys(source, epoch=3, rank=rank, world_size=2, worker=worker, num_workers=2, n=6)
    assert sorted(seen) == sorted(corpus.good_ids)  # 4 readers x 1 shard: every sample once
    with pytest.raises(ValueError, match="4 shards can't be split over 6 readers"):
        _keys(source, epoch=0, rank=0, world_size=3, worker=0, num_workers=2, n=1)


def test_split_reader_reshuffles_when_it_runs_out(four_shards):
    source = ShardSource.open(four_shards[0])
    keys = _keys(source, epoch=0, rank=0, world_size=1, worker=0, num_workers=1, n=48)
    assert sorted(keys[:24]) == sorted(keys[24:]) == sorted(four_shards[1].good_ids)
    assert keys[:24] != keys[24:]


def test_resampled_is_seeded_by_epoch_and_reader(four_shards):
    source = ShardSource.open(four_shards[0], resample=True)
    where = dict(rank=0, world_size=2, worker=0, num_workers=1, n=30)
    assert _keys(source, epoch=0, **where) == _keys(source, epoch=0, **where)
    assert _keys(source, epoch=0, **where) != _keys(source, epoch=1, **where)
    assert _keys(source, epoch=0, **where) != _keys(source, epoch=0, **{**where, "rank": 1})
    # with replacement: 30 records from 6-sample shards means repeats within one reader's epoch
    assert len(set(_keys(source, epoch=0, **where))) < 30


def test_corrupt_and_truncated_shards_become_skip_records(four_shards, tmp_path):
    pattern, _ = four_shards
    good = pattern.replace("{00..03}", "00")
    data = Path(good).read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tar").write_bytes(b"\x00junk" * 500)
    source = ShardSource.open(f"{good}::{tmp_path / 'cut.tar'}::{tmp_path / 'junk.tar'}")
    stream = source.records(
        seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1, shuffle_buffer=1
    )
    # one pass: 6 + (2 intact, 1 partial) + one error record for each damaged shard
    records = [next(stream) for _ in range(11)]
    corrupt = sorted(r.key.rsplit("/", 1)[1] for r in records if r.error == "corrupt_shard")
    assert corrupt == ["cut.tar", "junk.tar"]  # one count per damaged shard, however it broke
    # all of the good shard and the intact samples of the cut one still arrive
    intact = [r.key for r in records if r.error is None and r.image]
    assert set(intact) == {f"g{i:03d}" for i in range(6)} and len(intact) >= 8
