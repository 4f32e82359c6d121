"""Builders for the data-layer tests: tiny images in awkward modes, a corpus of bad samples, and
the same records written as JSONL, as the authors' CSV and as webdataset shards."""

from __future__ import annotations

import csv
import io
import json
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONERS = ("IB", "SV", "LLA")
IMAGE_SIZE = 16


@lru_cache(maxsize=1)
def tokenizer():
    from dreamlip.model import get_tokenizer

    return get_tokenizer("ViT-B-32")


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def random_rgb(seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height: PIL's bomb check fires on the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def odd_mode_images() -> dict[str, bytes]:
    """Decodable images in modes a plain ``convert("RGB")`` gets wrong or can't take directly."""
    palette = Image.new("P", (IMAGE_SIZE, IMAGE_SIZE), 1)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    sixteen = np.full((IMAGE_SIZE, IMAGE_SIZE), 32896, dtype=np.uint16)  # 32896 / 257 = 128
    return {
        "cmyk.jpg": encode(Image.new("CMYK", (IMAGE_SIZE, IMAGE_SIZE), (0, 255, 255, 0)), "JPEG"),
        "gray16.png": encode(Image.fromarray(sixteen)),
        "palette.png": encode(palette),
        "palette_trns.png": encode(palette, transparency=1),
        "rgba.png": encode(Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (10, 20, 30, 0))),
        "la.png": encode(Image.new("LA", (IMAGE_SIZE, IMAGE_SIZE), (50, 128))),
    }


def captions(i: int) -> dict[str, dict[str, str]]:
    return {
        name: {
            "short": f"{name} sees picture {i}.",
            "long": f"{name} describes picture {i}. There is a red ball number {i}. "
            f"A dog sits e.g. near 3.5 m of grass. The sky is blue over scene {i}.",
        }
        for name in CAPTIONERS
    }


@dataclass
class Corpus:
    root: Path
    records: list[dict]  # JSONL-schema records, image paths relative to root
    expected_skips: dict[str, int]
    good_ids: list[str]

    def write_jsonl(self, name: str = "data.jsonl", records: list[dict] | None = None) -> Path:
        path = self.root / name
        with open(path, "wb") as stream:
            for record in records if records is not None else self.records:
                # surrogateescape turns "\udcff" back into the raw byte 0xff: a non-UTF-8 line.
                stream.write(
                    json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape") + b"\n"
                )
        return path

    def write_csv(self, name: str = "data.csv") -> Path:
        """The authors' layout (plus an id column, so keys match the other readers)."""
        path = self.root / name
        columns = ["image", "raw_caption", "id"] + [
            f"{length}{c}_captions" for c in CAPTIONERS for length in ("short", "long")
        ]
        with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as stream:
            writer = csv.writer(stream)
            writer.writerow(columns)
            for record in self.records:
                row = [record["image"], record["raw_caption"], record["id"]]
                for name in CAPTIONERS:
                    by_length = record["captions"].get(name, {})
                    row += [by_length.get("short") or "", by_length.get("long") or ""]
                writer.writerow(row)
        return path


def _write(root: Path, name: str, data: bytes) -> str:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "images" / name).write_bytes(data)
    return f"images/{name}"


def good_corpus(root: Path, n: int, prefix: str = "g") -> Corpus:
    records = [
        {
            "image": _write(root, f"{prefix}{i}.png", encode(random_rgb(i))),
            "raw_caption": f"a photo {i}",
            "captions": captions(i),
            "id": f"{prefix}{i:03d}",
        }
        for i in range(n)
    ]
    return Corpus(root, records, {}, [r["id"] for r in records])


def bad_corpus(root: Path) -> Corpus:
    """16 good samples (10 plain, 6 in odd modes) and 9 bad ones, one per skip reason case.

    Ordered so both halves (records[:13], records[13:]) hold 8 good samples and end with a good
    one: a stream reading each half to its 8th good sample then meets every bad sample.
    """
    png = encode(random_rgb(99))
    bad = [
        ("missing", "images/does_not_exist.png", "a photo", None),
        ("empty", _write(root, "empty.png", b""), "a photo", None),
        ("corrupt", _write(root, "corrupt.jpg", np.random.default_rng(1).bytes(300)), "a photo", None),
        ("truncated", _write(root, "truncated.png", png[: len(png) // 2]), "a photo", None),
        ("bomb_warning", _write(root, "bomb1.png", png_header_only(10_000, 10_000)), "a photo", None),
        ("bomb_error", _write(root, "bomb2.png", png_header_only(30_000, 30_000)), "a photo", None),
        ("no_text", _write(root, "ok_a.png", png), "", {"IB": {"short": "", "long": ""}}),
        ("no_sentence", _write(root, "ok_b.png", png), "...", {"IB": {"short": " ", "long": "!!! ??? ..."}}),
        ("non_utf8", _write(root, "ok_c.png", png), "caf\udcff photo", None),
    ]
    expected = {
        "missing_image": 1,
        "empty_image": 1,
        "corrupt_image": 1,
        "truncated_image": 1,
        "image_too_large": 2,
        "no_text": 2,
        "text_encoding": 1,
    }
    odd = odd_mode_images()
    goods = [
        {
            "image": _write(root, f"plain{i}.png", encode(random_rgb(i))),
            "raw_caption": f"a photo {i}",
            "captions": captions(i),
        }
        for i in range(10)
    ] + [
        {"image": _write(root, name, data), "raw_caption": f"an odd {name}", "captions": captions(100 + j)}
        for j, (name, data) in enumerate(odd.items())
    ]
    bads = [
        {
            "image": image,
            "raw_caption": raw,
            "captions": caps if caps is not None else captions(0),
            "_name": name,
        }
        for name, image, raw, caps in bad
    ]
    # half A: g b g b g b g b g b g g g (8 good, 5 bad); half B: g b g b g b g b g g g g (8 good, 4 bad)
    pattern = "gbgbgbgbgbggg" + "gbgbgbgbgggg"
    records, g, b = [], iter(goods), iter(bads)
    for i, kind in enumerate(pattern):
        record = dict(next(g) if kind == "g" else next(b))
        name = record.pop("_name", "good")
        record["id"] = f"r{i:02d}-{name}"
        records.append(record)
    return Corpus(root, records, expected, [r["id"] for r in records if r["id"].endswith("-good")])
