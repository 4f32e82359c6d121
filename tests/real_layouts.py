"""Small datasets written in the layouts the field publishes, from their published headers and
examples (docs/data.md, "Layouts read", names the sources); the images are generated here.

- DreamLIP's released caption files (``cc3m_3long_3short_1raw_captions_url.csv``): the CSV header
  as published, the image a URL; its parquet conversion (FLAIR's ``convert_to_parquet.py``).
- LoTLIP's long-caption-only releases (``laion_3long_captions.csv``): no header is published; the
  columns are inferred (the image URL and the three long captions, named as DreamLIP's).
- img2dataset's output for either, as FLAIR's README runs it (``--url_col "Image Path"
  --save_additional_columns [raw_caption, short.., long..]``): webdataset tars of ``<key>.jpg`` +
  ``<key>.json`` (``indent=4``, the saved columns, then ``url key status error_message width height
  original_width original_height exif sha256``), a ``<shard>.parquet`` log of every row (failed
  downloads included) and ``<shard>_stats.json``; or ``--output_format files`` folders. Optionally
  pre-split as FLAIR's ``presplit_captions.py`` does (cut at newlines, ``</s>`` and every ".").
- Hugging Face ``*-wds`` repos (``pixparse/cc3m-wds``): ``cc3m-train-0000.tar`` of
  ``000000000.jpg`` + ``000000000.txt``.
- PixelProse's parquet (its 28 columns as the dataset viewer lists them, ``vlm_caption`` with
  Gemini's "This image displays:" opener) and Recap-DataComp-1B's (11 columns).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

DREAMLIP_HEADER = [
    "Image Path",
    "raw_caption",
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
]
CAPTION_COLUMNS = DREAMLIP_HEADER[1:]  # what FLAIR saves with --save_additional_columns
LOTLIP_HEADER = ["Image Path", "longIB_captions", "longSV_captions", "longLLA_captions"]
PIXELPROSE_COLUMNS = [
    "uid", "url", "key", "status", "original_caption", "vlm_model", "vlm_caption", "toxicity",
    "severe_toxicity", "obscene", "identity_attack", "insult", "threat", "sexual_explicit",
    "watermark_class_id", "watermark_class_score", "aesthetic_score", "error_message", "width",
    "height", "original_width", "original_height", "exif", "sha256", "image_id", "author",
    "subreddit", "score",
]
RECAP_DATACOMP_COLUMNS = [
    "url", "re_caption", "org_caption", "sha256", "key", "re_clip_score", "org_clip_score",
    "re_length", "org_length", "re_gpt4v_score", "org_gpt4v_score",
]
_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
_THINGS = ("car", "dog", "boat", "chair", "bicycle", "cake", "house", "umbrella")


def url(i: int, base: str = "https://images.example.com/cc3m") -> str:
    return f"{base}/{i:06d}.jpg"


def jpeg(i: int, size: tuple[int, int] = (48, 36)) -> bytes:
    """A small JPEG whose colour and pattern depend on ``i``."""
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] = np.array([37 * i % 256, 91 * i % 256, 53 * i % 256], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def dreamlip_row(i: int, base: str = "https://images.example.com/cc3m") -> dict[str, str]:
    """One row of the authors' release: a CC3M alt-text and three captioners' short and long
    captions in their usual style (InstructBLIP's "The image features...", LLaVA's list-like
    detail, ShareGPT4V's long paragraph)."""
    colour, thing = _COLOURS[i % len(_COLOURS)], _THINGS[i % len(_THINGS)]
    return {
        "Image Path": url(i, base),
        "raw_caption": f"a {thing} in the city during the festival {i}",
        "shortIB_captions": f"a {colour} {thing} parked on a street",
        "longIB_captions": (
            f"The image features a {colour} {thing} on a busy street. There are several people walking "
            f"nearby, e.g. a woman with a bag. In the background, a building with {i % 5 + 2} windows is visible."
        ),
        "shortSV_captions": f"A {colour} {thing} on a city street.",
        "longSV_captions": (
            f"In the image, a {colour} {thing} is the main subject.\nIt stands on grey pavement next to a "
            f"lamp post. The sky is overcast and the light is soft.</s>"
        ),
        "shortLLA_captions": f"{colour} {thing} outdoors",
        "longLLA_captions": (
            f"The image shows a {colour} {thing} in an urban setting. Key details:\n1. The {thing} is "
            f"{colour}.\n2. People walk past it.\n3. A shop sign reads {i}."
        ),
    }


def write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, columns: list[str], rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)
    return path


def flair_presplit(text: str) -> list[str]:
    """FLAIR's preprocess/presplit_captions.py rule: cut at newlines, ``</s>`` and every "."."""
    return [piece.strip() for piece in re.split(r"\n|</s>|[.]", text) if piece.strip()]


def img2dataset_output(
    folder: Path,
    rows: list[dict],
    *,
    url_col: str = "Image Path",
    caption_col: str | None = None,
    save_additional_columns: list[str] | None = None,
    shard_size: int = 4,
    failed: set[int] = frozenset(),
    output_format: str = "webdataset",
    presplit: bool = False,
) -> list[Path]:
    """What img2dataset writes for ``rows`` (its input table); row ``i`` in ``failed`` got a 404.
    Returns the tars (webdataset) or the shard folders (files)."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = list(save_additional_columns or [])
    oom_sample = math.ceil(math.log10(shard_size))
    written = []
    for shard, start in enumerate(range(0, len(rows), shard_size)):
        name = f"{shard:05d}"
        log, samples = [], []
        successes = 0
        for index, row in enumerate(rows[start : start + shard_size]):
            i = start + index
            key = f"{shard:05d}{index:0{oom_sample}d}"
            meta = {c: row.get(c) for c in columns}
            if caption_col is not None:
                meta["caption"] = row[caption_col]
            meta |= {"url": row[url_col], "key": key, "status": None, "error_message": None, "width": None,
                     "height": None, "original_width": None, "original_height": None, "exif": None, "sha256": None}
            if i in failed:
                meta |= {"status": "failed_to_download", "error_message": "HTTP Error 404: Not Found"}
            else:
                data = jpeg(i)
                meta |= {"status": "success", "width": 48, "height": 36, "original_width": 48,
                         "original_height": 36, "exif": "{}", "sha256": hashlib.sha256(data).hexdigest()}
                successes += 1
                shown = dict(meta)
                if presplit:
                    shown |= {c: flair_presplit(shown[c]) for c in CAPTION_COLUMNS if isinstance(shown.get(c), str)}
                members = [(f"{key}.jpg", data)]
                if caption_col is not None:
                    members.append((f"{key}.txt", str(meta["caption"]).encode()))
                members.append((f"{key}.json", json.dumps(shown, indent=4).encode()))
                samples.append(members)
            log.append(meta)
        if output_format == "webdataset":
            written.append(_tar(folder / f"{name}.tar", [m for members in samples for m in members]))
        else:
            (folder / name).mkdir(exist_ok=True)
            for members in samples:
                for member, data in members:
                    (folder / name / member).write_bytes(data)
            written.append(folder / name)
        write_parquet(folder / f"{name}.parquet", list(log[0]), log)
        stats = {"count": len(log), "successes": successes, "failed_to_download": len(log) - successes,
                 "failed_to_resize": 0, "duration": 0.1, "start_time": 0.0, "end_time": 0.1,
                 "status_dict": {"success": successes, "HTTP Error 404: Not Found": len(log) - successes}}
        (folder / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return written


def hf_wds(folder: Path, rows: list[dict], *, shard_size: int = 4) -> list[Path]:
    """pixparse/cc3m-wds: ``cc3m-train-0000.tar`` of ``000000000.jpg`` + ``000000000.txt``."""
    tars = []
    for shard, start in enumerate(range(0, len(rows), shard_size)):
        members = []
        for i in range(start, min(start + shard_size, len(rows))):
            members += [(f"{i:09d}.jpg", jpeg(i)), (f"{i:09d}.txt", rows[i]["raw_caption"].encode())]
        tars.append(_tar(folder / f"cc3m-train-{shard:04d}.tar", members))
    return tars


def pixelprose_row(i: int) -> dict:
    """A row as PixelProse's dataset viewer shows them (the first one's texts, varied by ``i``)."""
    colour, thing = _COLOURS[i % len(_COLOURS)], _THINGS[i % len(_THINGS)]
    return {
        "uid": hashlib.sha256(f"uid{i}".encode()).hexdigest(), "url": url(i, "https://media.example.com/pp"),
        "key": f"{7740026 + i:09d}", "status": "success",
        "original_caption": f"A plate of food with a {colour} {thing} at the fair",
        "vlm_model": "gemini-pro-vision",
        "vlm_caption": (
            f"This image displays: A plate of fried calamari with a lemon wedge and a {colour} {thing}, "
            "served in a basket. The basket is sitting on a table with a checkered tablecloth."
        ),
        "toxicity": 0.001, "severe_toxicity": 0.0, "obscene": 0.0, "identity_attack": 0.0, "insult": 0.0,
        "threat": 0.0, "sexual_explicit": 0.0, "watermark_class_id": 0.0, "watermark_class_score": 0.9,
        "aesthetic_score": 5.1, "error_message": None, "width": 48, "height": 36, "original_width": 612,
        "original_height": 459, "exif": "{}", "sha256": hashlib.sha256(jpeg(i)).hexdigest(),
        "image_id": None, "author": None, "subreddit": -1, "score": -1,
    }


def recap_datacomp_row(i: int) -> dict:
    colour, thing = _COLOURS[i % len(_COLOURS)], _THINGS[i % len(_THINGS)]
    return {
        "url": url(i, "https://cdn.example.com/dc"), "org_caption": f"{thing} for sale {i}",
        "re_caption": f"A {colour} {thing} is displayed against a plain background. The lighting is even.",
        "sha256": hashlib.sha256(jpeg(i)).hexdigest(), "key": f"{i:09d}", "re_clip_score": 0.31,
        "org_clip_score": 0.27, "re_length": 14, "org_length": 4, "re_gpt4v_score": 4, "org_gpt4v_score": 2,
    }


def files_url_map(folder: Path, rows: list[dict], url_col: str, **kwargs) -> Path:
    """img2dataset ``--output_format files`` output for ``rows``: the URL map a table's
    ``urlmap=`` option reads."""
    img2dataset_output(folder, rows, url_col=url_col, output_format="files", **kwargs)
    return folder


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path
