"""The data SPEC string: kinds, options, weights, and clear refusals."""

import pytest

from dreamlip.data.spec import SourceSpec, SpecError, parse_spec


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("train.jsonl", [SourceSpec("jsonl", "train.jsonl")]),
        (
            "csv:ann.txt?images=/data/cc3m&naming=sha1",
            [SourceSpec("csv", "ann.txt", None, {"images": "/data/cc3m", "naming": "sha1"})],
        ),
        ("shards/{00000..00009}.tar", [SourceSpec("wds", "shards/{00000..00009}.tar")]),
        (
            "a.jsonl:0.7,wds:b/{0..3}.tar?resample=1&samples=500:0.3",
            [
                SourceSpec("jsonl", "a.jsonl", 0.7),
                SourceSpec("wds", "b/{0..3}.tar", 0.3, {"resample": "1", "samples": "500"}),
            ],
        ),
        # a comma inside braces is part of the brace pattern, not a second source
        (
            "wds:s/{a,b}.tar:2,x.csv:1",
            [SourceSpec("wds", "s/{a,b}.tar", 2.0), SourceSpec("csv", "x.csv", 1.0)],
        ),
        ("a.tar::b.tar", [SourceSpec("wds", "a.tar::b.tar")]),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("a.jsonl:0.5,b.jsonl", "every source or to none"),
        ("data.arrow", "prefix it with jsonl:, csv:, parquet: or wds:"),
        ("a.jsonl?samples=3", "unknown option 'samples=3'; jsonl sources take images"),
        ("wds:a.tar?images=x", "unknown option"),
        ("a.csv?naming=crc", "naming must be one of"),
        ("a.tar?samples=-1", "samples must be a positive integer"),
        ("a.tar?resample=maybe", "resample must be 0 or 1"),
        ("a.jsonl:0", "must be > 0"),
        ("a.jsonl,,b.jsonl", "empty source"),
        ("a.jsonl?images=x&images=y", "given twice"),
    ],
)
def test_parse_spec_errors(spec, message):
    with pytest.raises(SpecError, match=message.replace("?", r"\?")):
        parse_spec(spec)
