"""dreamlip.io: safe image decoding (odd modes come out as the right RGB pixels, bad bytes become
BadSample), atomic writes."""

import warnings

import numpy as np
import pytest
from data_fixtures import encode, odd_mode_images, png_header_only, random_rgb
from PIL import Image

from dreamlip.io import BadSample, atomic_write, decode_image, read_image_file, remove_partial_writes

ODD = odd_mode_images()


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gray16.png", (128, 128, 128)),  # PIL's own convert would clip to 255
        ("palette.png", (200, 30, 30)),
        ("palette_trns.png", (255, 255, 255)),  # the transparent index shows the white background
        ("rgba.png", (255, 255, 255)),  # fully transparent: white, not the stored (10, 20, 30)
        ("la.png", (153, 153, 153)),  # 50 at alpha 128 over white: 50*128/255 + 255*127/255
    ],
)
def test_odd_modes_decode_to_expected_rgb(name, expected):
    image = decode_image(ODD[name])
    assert image.mode == "RGB"
    np.testing.assert_allclose(np.asarray(image)[0, 0], expected, atol=1)


def test_cmyk_jpeg_becomes_red():
    pixel = np.asarray(decode_image(ODD["cmyk.jpg"]))[4, 4].astype(int)
    assert pixel[0] > 200 and pixel[1] < 40 and pixel[2] < 40


def test_rgb_png_is_lossless():
    image = random_rgb(3)
    np.testing.assert_array_equal(np.asarray(decode_image(encode(image))), np.asarray(image))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=100))
    assert decoded.size == (2, 4)
    assert np.asarray(decoded)[0, 1].mean() > 200  # top-left corner moved to the top-right


def test_jpeg_draft_downscales_but_keeps_requested_size():
    big = encode(random_rgb(0, size=256), "JPEG")
    assert decode_image(big, draft=60).size == (64, 64)
    assert decode_image(big).size == (256, 256)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_image"),
        (b"definitely not an image" * 20, "corrupt_image"),
        (encode(random_rgb(1))[:300], "truncated_image"),
        (encode(random_rgb(1), "JPEG")[:40], "truncated_image"),
        (png_header_only(10_000, 10_000), "image_too_large"),  # PIL warns (above 1x the limit)
        (png_header_only(30_000, 30_000), "image_too_large"),  # PIL raises (above 2x)
    ],
)
def test_bad_bytes_raise_bad_sample_with_reason(data, reason):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bomb warning must be caught inside, not leak out
        with pytest.raises(BadSample) as info:
            decode_image(data)
    assert info.value.reason == reason


def test_bomb_limit_follows_pil_setting(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadSample, match="image_too_large"):
        decode_image(encode(random_rgb(0, size=16)))  # 256 pixels > 2 x 100


def test_read_image_file_reasons(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(BadSample) as missing:
        read_image_file(tmp_path / "nope.png")
    with pytest.raises(BadSample) as empty:
        read_image_file(tmp_path / "zero.png")
    with pytest.raises(BadSample) as directory:
        read_image_file(tmp_path)
    assert (missing.value.reason, empty.value.reason, directory.value.reason) == (
        "missing_image",
        "empty_image",
        "missing_image",
    )


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out" / "data.json"
    atomic_write(target, lambda handle: handle.write("old"))

    def fail_halfway(handle):
        handle.write("half of the new cont")
        raise KeyboardInterrupt  # a kill mid-write, as far as this process can simulate one

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail_halfway)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["data.json"]
    atomic_write(target, lambda handle: handle.write(b"new"), binary=True)
    assert target.read_bytes() == b"new"


def test_partial_writes_of_a_killed_process_are_removed(tmp_path):
    (tmp_path / ".a.jsonl.tmp-0123abcd").write_text("left by a killed process")
    (tmp_path / ".b.pt.tmp-4567").write_text("another one")
    (tmp_path / ".keep").write_text("not ours")
    atomic_write(tmp_path / "a.jsonl", lambda handle: handle.write("x"), locked=True)  # its own only
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.pt.tmp-4567", ".keep", "a.jsonl"]
    assert remove_partial_writes(tmp_path) == [tmp_path / ".b.pt.tmp-4567"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".keep", "a.jsonl"]
