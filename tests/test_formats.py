"""dreamlip.formats, the one layer that knows dataset layouts: its folder walk, tar grouping, JSONL
lines, demo layout and source detection; and the same folder, JSONL file or tar giving the same
images through every command that reads it (training, eval, recaption, serve)."""

import io
import json
import os
import tarfile

import pytest
from data_fixtures import encode, random_rgb

from dreamlip.data.shards import ShardSource
from dreamlip.data.spec import open_source, parse_spec
from dreamlip.eval.datasets import read_classification, read_retrieval
from dreamlip.formats import (
    BadLine,
    demo_image_name,
    detect_source,
    index_tar,
    is_image_name,
    jsonl_objects,
    list_images,
    stream_tar,
    tar_paths,
    wds_key_ext,
)
from dreamlip.io import read_image_file
from dreamlip.recaption import InputError, open_input
from dreamlip.serve.index import read_collection


def _image(seed: int) -> bytes:
    return encode(random_rgb(seed))


def _put(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _tar(path, members: list[tuple[str, bytes]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_image_names_and_webdataset_keys():
    assert [is_image_name(n) for n in ("a/b.JPG", "x.tiff", "a.txt", ".hidden.png", "png", "dir.png/x")] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    # webdataset's rule: the key ends at the file name's first dot; directories are part of it
    assert wds_key_ext("shard/0001.seg.PNG") == ("shard/0001", "seg.png")
    assert wds_key_ext("a.b/c.jpg") == ("a.b/c", "jpg")
    assert wds_key_ext("README") == ("README", "")


def test_the_folder_walk_skips_hidden_entries_at_every_depth_and_follows_links(tmp_path):
    root = tmp_path / "photos"
    for name in ("b.png", "A.JPG", "sub/c.webp", "sub/deeper/d.tiff", ".cache/e.png", "sub/.ipynb_checkpoints/f.png",
                 "._g.jpg", "notes.txt", "sub/h.PNG"):
        _put(root / name, b"x")
    _put(tmp_path / "elsewhere" / "i.png", b"x")
    os.symlink(tmp_path / "elsewhere", root / "linked")
    os.symlink(root, root / "sub" / "loop")  # a link back up: walked once
    listed = [str(p.relative_to(root)) for p in list_images(root)]
    assert listed == ["A.JPG", "b.png", "linked/i.png", "sub/c.webp", "sub/deeper/d.tiff", "sub/h.PNG"]


def test_streamed_and_indexed_tars_group_members_as_webdataset_does(tmp_path):
    # Members of one key that are not consecutive are two samples, as webdataset reads them.
    members = [("a.jpg", b"1"), ("a.json", b"{}"), ("b.seg.png", b"2"), ("b.png", b"3"), ("a.jpg", b"4")]
    _tar(tmp_path / "s.tar", members)
    streamed = [(key, [(name, data) for name, data in group]) for key, group in stream_tar(tmp_path / "s.tar")]
    assert streamed == [("a", members[:2]), ("b", members[2:4]), ("a", members[4:])]
    indexed = [(key, {ext: m.read() for ext, m in by_ext.items()}) for key, by_ext in index_tar(tmp_path / "s.tar")]
    assert indexed == [("a", {"jpg": b"1", "json": b"{}"}), ("b", {"seg.png": b"2", "png": b"3"}), ("a", {"jpg": b"4"})]
    _tar(tmp_path / "z.tar.gz", members, "w:gz")
    assert [key for key, _ in stream_tar(tmp_path / "z.tar.gz")] == ["a", "b", "a"]
    with pytest.raises(tarfile.ReadError):  # a compressed tar cannot be seeked into
        next(index_tar(tmp_path / "z.tar.gz"))


def test_tar_paths_of_a_folder_a_pattern_and_a_missing_shard(tmp_path):
    for name in ("00001.tar", "00000.tar", "part2/00002.tar", ".old/00003.tar"):
        _put(tmp_path / "shards" / name, b"")
    assert [str(p.relative_to(tmp_path / "shards")) for p in tar_paths(tmp_path / "shards")] == [
        "00000.tar", "00001.tar", "part2/00002.tar",
    ]
    assert [p.name for p in tar_paths(f"{tmp_path}/shards/{{00000..00001}}.tar")] == ["00000.tar", "00001.tar"]
    with pytest.raises(FileNotFoundError, match=r"1 of 3 shards .* not found, e\.g\. .*00002\.tar"):
        tar_paths(f"{tmp_path}/shards/{{00000..00002}}.tar")


def test_jsonl_lines_skip_blanks_allow_a_bom_and_name_a_bad_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n  \n{"b": "caf\xe9"}\n[2]\n')
    lines = list(jsonl_objects(path))
    assert [(n, v) for n, v in lines if n != 4] == [(1, {"a": 1}), (5, [2])]
    assert lines[1][1]["b"].encode("utf-8", "surrogateescape") == b"caf\xe9"  # the bad byte kept
    path.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(BadLine, match=r"a\.jsonl:2: not valid JSON \(Expecting value at column 7\)"):
        list(jsonl_objects(path))


def test_detect_source(tmp_path):
    from dreamlip.synthetic import generate

    demo = tmp_path / "demo"
    generate(demo, n_train=2, n_test=2, image_size=32, seed=0, workers=1)
    _put(tmp_path / "imgs" / "a.png", b"x")
    _put(tmp_path / "wds" / "sub" / "0.tar", b"")
    for name in ("a.jsonl", "b.ndjson", "c.json", "d.txt", "e.csv"):
        _put(tmp_path / name, b"")
    kinds = {
        str(demo): "demo", "csv:x.csv?images=y": "spec", "a.parquet": "table", str(tmp_path / "e.csv"): "table",
        "s/{0..3}.tar": "shards", "s/0.tar.gz": "shards", str(tmp_path / "wds"): "shards", str(tmp_path / "imgs"): "folder",
        str(tmp_path / "a.jsonl"): "jsonl", str(tmp_path / "b.ndjson"): "jsonl", str(tmp_path / "c.json"): "json",
        str(tmp_path / "d.txt"): "file", str(tmp_path / "nothing.jsonl"): "missing",
    }
    assert {data: detect_source(data) for data in kinds} == kinds


def test_the_demo_layout_the_writer_names_is_the_one_readers_find(tmp_path):
    from dreamlip.synthetic import generate

    generate(tmp_path, n_train=2, n_test=3, image_size=32, seed=0, workers=1)
    records = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [demo_image_name("test", f"{i:06d}") for i in range(3)]
    served = read_collection(tmp_path, split="test")
    assert [str(item.image) for item in served.items] == [str((tmp_path / r["image"]).resolve()) for r in records]
    assert read_classification(tmp_path, split="train").images == [str((tmp_path / demo_image_name("train", f"{i:06d}")).resolve()) for i in range(2)]
    # Its folder holds images and masks: recaption names the split to read instead of walking it.
    with pytest.raises(InputError, match="demo-data directory: recaption one split's records"):
        open_input(str(tmp_path), tmp_path / "out.jsonl")


# ---------------------------------------------------------------------------------------------
# The same input through every command


def _recaptioned(data, out) -> list[bytes]:
    source = open_input(str(data), out)
    return [sample.read_image() for unit in source.units() for sample in source.samples(unit)]


def _served(data) -> list[bytes]:
    return [_bytes(item.image) for item in read_collection(data).items]


def _bytes(image) -> bytes:
    return image.read() if hasattr(image, "read") else read_image_file(image)


def test_a_folder_gives_the_same_images_to_eval_serve_and_recaption(tmp_path):
    """Class folders with a hidden checkpoint folder, an AppleDouble file, a nested subfolder and
    an upper-case extension: eval's classes, serve's collection and recaption's input hold the
    same images, in the same order."""
    root = tmp_path / "pets"
    images = {"cat/c1.png": 1, "cat/.ipynb_checkpoints/c1.png": 2, "dog/D2.JPG": 3, "dog/._D2.JPG": 4,
              "dog/sub/d3.webp": 5, ".trash/x.png": 6, "cat/c0.png": 7}
    for name, seed in images.items():
        _put(root / name, _image(seed))
    _put(root / "dog" / "notes.txt", b"not an image")
    expected = [_image(seed) for seed in (7, 1, 3, 5)]  # cat/c0, cat/c1, dog/D2, dog/sub/d3
    classified = read_classification(root)
    assert classified.classnames == ["cat", "dog"] and classified.labels == [0, 0, 1, 1]
    assert [_bytes(image) for image in classified.images] == expected
    assert _served(root) == expected
    assert _recaptioned(root, tmp_path / "out.jsonl") == expected


def test_a_jsonl_file_gives_the_same_images_to_train_eval_serve_and_recaption(tmp_path):
    root = tmp_path / "set"
    lines = []
    for i, name in enumerate(["img/a.png", "img/sub/b.png", "c.PNG"]):
        _put(root / name, _image(10 + i))
        lines.append(json.dumps({"image": name, "raw_caption": f"image {i}"}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n\n")
    expected = [_image(10 + i) for i in range(3)]
    table = open_source(parse_spec(str(root / "train.jsonl"))[0])
    assert [_bytes(table[i].image) for i in range(len(table))] == expected
    assert [_bytes(image) for image in read_retrieval(root / "train.jsonl").images] == expected
    assert _served(root / "train.jsonl") == expected
    assert _recaptioned(root / "train.jsonl", tmp_path / "out.jsonl") == expected


def test_a_tar_gives_the_same_images_to_train_eval_serve_and_recaption(tmp_path):
    """A shard with a sample holding two images (jpg is read before png), an upper-case extension,
    a sample whose key comes back after another (webdataset: two samples) and a member without a
    key: every command reads the same samples' images in tar order."""
    members = [
        ("0.png", _image(20)), ("0.jpg", _image(21)), ("0.json", b'{"raw_caption": "zero"}'),
        ("1.PNG", _image(22)), ("1.txt", b"one"),
        ("README", b"not a sample"),
        ("2.webp", _image(23)), ("2.json", b'{"raw_caption": "two"}'),
        ("1.jpg", _image(24)), ("1.json", b'{"raw_caption": "one again"}'),
    ]
    tar = tmp_path / "shards" / "00000.tar"
    tar.parent.mkdir()
    _tar(tar, members)
    expected = [_image(21), _image(22), _image(23), _image(24)]
    trained = ShardSource.open(str(tar)).records(seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1, shuffle_buffer=1)
    assert [next(trained).image for _ in expected] == expected
    assert [_bytes(image) for image in read_retrieval(tar, texts="raw").images] == expected
    assert _served(tar) == expected
    assert _served(tar.parent) == expected
    assert _recaptioned(tar.parent, tmp_path / "out") == expected
