"""Record readers: schema errors name file, line and field; content problems become skip reasons."""

import hashlib
import json

import pytest
from data_fixtures import bad_corpus, good_corpus

from dreamlip.data.records import SchemaError, key_index, read_csv, read_jsonl

GOOD = {"image": "a.png", "raw_caption": "x", "captions": {"IB": {"short": "s", "long": "l"}}}


def _jsonl(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "line, field, problem",
    [
        ('{"image": "a.png", "raw_caption": "x"', None, "not valid JSON"),
        ('["a.png", "x"]', None, "expected a JSON object"),
        ('{"raw_caption": "x"}', "image", "missing"),
        ('{"image": "a.png"}', "raw_caption", "missing"),
        ('{"image": 7, "raw_caption": "x"}', "image", "expected str"),
        ('{"image": "a.png", "raw_caption": "x", "captions": ["long text"]}', "captions", "expected dict"),
        (
            '{"image": "a.png", "raw_caption": "x", "captions": {"IB": {"medium": "t"}}}',
            "captions.IB.medium",
            "'short' or 'long'",
        ),
        (
            '{"image": "a.png", "raw_caption": "x", "captions": {"IB": {"long": 3}}}',
            "captions.IB.long",
            "expected str",
        ),
        ('{"image": "a.png", "raw_caption": "x", "captoins": {}}', "captoins", "did you mean 'captions'?"),
        ('{"image": "a.png", "raw_captions": "x"}', "raw_captions", "did you mean 'raw_caption'?"),
        ('{"image": "a.png", "raw_caption": "x", "objcts": []}', "objcts", "did you mean 'objects'?"),
        ('{"image": "a.png", "raw_caption": "x", "longIB_captions": 3}', "longIB_captions", "expected str"),
        (
            '{"image": "a.png", "raw_caption": "x", "captions": {"IB": {"long": "a"}}, "longIB_captions": "b"}',
            "longIB_captions",
            "gives captions.IB.long a second time",
        ),
        ('{"image": "a.png", "raw_caption": "x", "texts": "one"}', "texts", "expected list or dict"),
        ('{"image": "a.png", "raw_caption": "x", "id": true}', "id", "expected str or int"),
    ],
)
def test_jsonl_schema_error_names_file_line_field(tmp_path, line, field, problem):
    path = _jsonl(tmp_path, [json.dumps(GOOD), "", line])  # blank line 2 is allowed
    with pytest.raises(SchemaError) as info:
        read_jsonl(path)
    err = info.value
    assert (err.source, err.line, err.field) == (str(path), 3, field)
    assert problem in str(err) and str(err).startswith(f"{path}:3: ")


def test_jsonl_reads_records_resolves_paths_and_keys(tmp_path):
    lines = [
        json.dumps(GOOD),
        json.dumps({**GOOD, "id": 42, "label": 3, "mask": "m.png"}),
        json.dumps({**GOOD, "captions": None}),
    ]
    table = read_jsonl(_jsonl(tmp_path, lines))
    assert len(table) == 3
    first, second, third = table[0], table[1], table[2]
    assert first.key == "000000000" and second.key == "42" and third.key == "000000002"
    assert first.image == str(tmp_path.resolve() / "a.png")
    assert first.captions == {"IB": {"short": "s", "long": "l"}} and third.captions == {}
    assert second.extras == {"label": 3, "mask": str(tmp_path.resolve() / "m.png")}
    assert first.error is None


def test_other_fields_and_columns_pass_through(tmp_path):
    line = json.dumps({**GOOD, "background": {"kind": "plain"}, "uid": "u1", "image_id": 7, "img": "b.png"})
    table = read_jsonl(_jsonl(tmp_path, [line]))
    assert table[0].extras == {"background": {"kind": "plain"}, "uid": "u1", "image_id": 7, "img": "b.png"}
    assert table.unread == ()
    path = tmp_path / "ann.csv"
    path.write_text("image,raw_caption,url,width\na.png,x,http://x/a.png,640\n")
    assert read_csv(path)[0].extras == {"url": "http://x/a.png", "width": "640"}


def test_common_words_near_a_field_name_are_metadata_not_typos(tmp_path):
    """A split column "test" is not "text" misspelt, nor "mark" "mask": one replaced letter in a
    short name makes another word as often as a typo. Slips that add, drop or swap letters still
    are typos, and a short replaced-letter slip of a required field still fails as that field missing."""
    line = json.dumps({**GOOD, "test": True, "mark": "x", "code": 3})
    assert read_jsonl(_jsonl(tmp_path, [line]))[0].extras == {"test": True, "mark": "x", "code": 3}
    path = tmp_path / "ann.csv"
    path.write_text("image,text,test\na.png,a dog,0\n")
    assert read_csv(path)[0].raw_caption == "a dog" and read_csv(path)[0].extras == {"test": "0"}
    for name, meant in (("imge", "image"), ("imgae", "image"), ("lable", "label"), ("textt", "text")):
        with pytest.raises(SchemaError, match=f"did you mean {meant!r}"):
            read_jsonl(_jsonl(tmp_path, [json.dumps({**GOOD, name: "x"})]))
    with pytest.raises(SchemaError, match="field 'image': missing"):
        read_jsonl(_jsonl(tmp_path, [json.dumps({"imagr": "a.png", "raw_caption": "x"})]))


def test_caption_like_fields_nothing_reads_stay_metadata_and_are_named(tmp_path):
    """A second alt-text (img2dataset's caption beside raw_caption) and captions under names no
    layout uses are kept, not dropped, and the table names them for the note at start."""
    line = json.dumps({**GOOD, "caption": "alt", "long_desc_caption": "t", "description": "d", "url": "u"})
    table = read_jsonl(_jsonl(tmp_path, [line, json.dumps(GOOD)]))
    assert table[0].raw_caption == "x" and table[0].extras["caption"] == "alt"
    assert table.unread == ("caption", "long_desc_caption", "description")


def test_non_utf8_line_is_a_bad_sample_not_a_bad_file(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"image": "b.png", "raw_caption": "caf\xe9"}\n')
    table = read_jsonl(path)
    assert [table[0].error, table[1].error] == [None, "text_encoding"]


def test_csv_maps_authors_columns_to_captioners(tmp_path):
    corpus = good_corpus(tmp_path, 3)
    table = read_csv(corpus.write_csv())
    record = table[2]
    assert record.key == "g002"
    assert set(record.captions) == {"IB", "SV", "LLA"}
    assert record.captions["SV"] == corpus.records[2]["captions"]["SV"]
    assert record.image == str(tmp_path.resolve() / "images" / "g2.png")


def _texts(captions):
    """Captions with empty strings as None and all-empty captioners dropped: a CSV has no way to
    tell an empty cell from a missing caption, and both mean "nothing" to the sampler."""
    cleaned = {name: {k: v or None for k, v in by_length.items()} for name, by_length in captions.items()}
    return {name: by_length for name, by_length in cleaned.items() if any(by_length.values())}


def test_csv_and_jsonl_read_the_same_records(tmp_path):
    corpus = bad_corpus(tmp_path)
    from_jsonl, from_csv = read_jsonl(corpus.write_jsonl()), read_csv(corpus.write_csv())
    assert len(from_jsonl) == len(from_csv) == len(corpus.records)
    for i in range(len(from_jsonl)):
        a, b = from_jsonl[i], from_csv[i]
        assert (a.key, a.image, a.raw_caption or None, a.error) == (b.key, b.image, b.raw_caption, b.error)
        assert _texts(a.captions) == _texts(b.captions)
    assert sum(from_csv[i].error == "text_encoding" for i in range(len(from_csv))) == 1


@pytest.mark.parametrize(
    "header, rows, line, field, problem",
    [
        ("imgae,raw_caption", [], 1, "imgae", "unknown field; did you mean 'image'?"),
        ("img,raw_caption", [], 1, "image", "missing (also looked for 'Image Path' and 'url')"),
        ("image,width", [], 1, "raw_caption", "missing: no caption field"),
        ("image,raw_caption,image", [], 1, "image", "appears twice"),
        ("image,raw_caption", ["a.png,x", "b.png,y,extra"], 3, None, "row has 3 fields, header has 2"),
        ("", [], 1, None, "empty file"),
    ],
)
def test_csv_schema_errors(tmp_path, header, rows, line, field, problem):
    path = tmp_path / "ann.csv"
    path.write_text("\n".join([header, *rows]) + ("\n" if header else ""))
    with pytest.raises(SchemaError) as info:
        read_csv(path)
    assert (info.value.line, info.value.field) == (line, field)
    assert problem in str(info.value) and str(path) in str(info.value)


def test_csv_quoted_multiline_caption_and_pandas_index(tmp_path):
    path = tmp_path / "ann.csv"
    path.write_text(',image,raw_caption,longLLA_captions\n0,a.png,x,"First line.\nSecond line."\n')
    record = read_csv(path)[0]
    assert record.captions == {"LLA": {"short": None, "long": "First line.\nSecond line."}}


def test_url_images_resolve_by_map_hash_or_basename(tmp_path):
    url = "http://example.com/photos/cat.jpg?size=large"
    path = tmp_path / "ann.csv"
    path.write_text(f"image,raw_caption\n{url},x\nhttp://example.com/unmapped.jpg,y\n")
    (tmp_path / "map.tsv").write_text(f"{url}\tdl/000001.jpg\n")
    mapped = read_csv(path, url_map=tmp_path / "map.tsv", images=tmp_path / "root")
    assert mapped[0].image == str(tmp_path / "root" / "dl" / "000001.jpg")
    assert mapped[1].image is None  # not in the map: counted as missing_image when loaded
    digest = hashlib.sha1(url.encode()).hexdigest()
    assert read_csv(path, naming="sha1", ext="png")[0].image == str(tmp_path / f"{digest}.png")
    assert read_csv(path, naming="basename")[0].image == str(tmp_path / "cat.jpg")
    with pytest.raises(SchemaError, match=r"ann\.csv:2: field 'image': is a URL"):
        read_csv(path)


def test_bad_url_map_line(tmp_path):
    (tmp_path / "ann.jsonl").write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "map.tsv").write_text("http://a/b.jpg only-one-column\n")
    with pytest.raises(SchemaError, match=r"map\.tsv:1: expected 'URL<TAB>PATH'"):
        read_jsonl(tmp_path / "ann.jsonl", url_map=tmp_path / "map.tsv")


def test_key_index_is_stable_and_spread():
    assert key_index("g001") == key_index("g001")
    values = {key_index(f"k{i}") for i in range(1000)}
    assert len(values) == 1000 and all(0 <= v < 2**63 for v in values)
