"""Long-text retrieval benchmarks, from each set's released annotation layout to ``{image, caption}``.

Every converter returns ``(items, skipped)``: ``items`` a list of ``{"image": ABSOLUTE_PATH,
"caption": TEXT}`` in the release's order, ``skipped`` counts entries left out on purpose (named by
reason). Captions are kept as released (newlines included: the tokenizer treats them as spaces,
and ``--long-text sentences`` as sentence breaks). A missing image or a malformed entry is a
:class:`ConvertError` naming the file and entry: a benchmark with silently dropped images is
another benchmark. The layouts, and the papers whose splits these are, are in docs/eval.md.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dreamlip.formats import BadLine, jsonl_objects

__all__ = ["CONVERTERS", "ConvertError", "dci", "docci", "iiw", "sharegpt4v", "urban1k"]

Items = list[dict[str, str]]


class ConvertError(ValueError):
    """The source is not in the layout the converter reads, or names an image that is not there."""


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConvertError(f"{path}: not valid JSON ({err})") from None


def _read_jsonl(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        for number, entry in jsonl_objects(path):
            if not isinstance(entry, dict):
                raise ConvertError(f"{path}:{number}: expected a JSON object")
            yield number, entry
    except BadLine as err:
        raise ConvertError(str(err)) from None


def _text(entry: dict[str, Any], field: str, where: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not value.strip():
        raise ConvertError(f"{where}: no text in field {field!r}")
    return value.strip()


def _checked(items: Items, source: Path) -> Items:
    """The items, once every image is known to exist (one error listing the missing)."""
    missing = [item["image"] for item in items if not Path(item["image"]).is_file()]
    if missing:
        raise ConvertError(
            f"{source}: {len(missing)} of {len(items)} images are missing, e.g. {', '.join(missing[:3])}"
        )
    if not items:
        raise ConvertError(f"{source}: no images")
    return items


def _item(image: Path, caption: str) -> dict[str, str]:
    return {"image": str(image.resolve()), "caption": caption}


# ---------------------------------------------------------------------------------------------


def urban1k(src: Path) -> tuple[Items, Counter]:
    """Urban1k (Long-CLIP's release, huggingface.co/datasets/BeichenZhang/Urban1k): ``SRC/image/
    NAME.jpg`` and ``SRC/caption/NAME.txt``; the caption is the text file's first line, as
    Long-CLIP's eval/retrieval/Urban1k.py reads it. All 1000 pairs, sorted by name."""
    images, captions = src / "image", src / "caption"
    if not images.is_dir() or not captions.is_dir():
        raise ConvertError(f"{src}: expected Urban1k's image/ and caption/ folders")
    items = []
    for caption_file in sorted(captions.glob("*.txt")):
        lines = caption_file.read_text(encoding="utf-8").splitlines()
        if not lines or not lines[0].strip():
            raise ConvertError(f"{caption_file}: empty caption")
        items.append(_item(images / f"{caption_file.stem}.jpg", lines[0].strip()))
    return _checked(items, src), Counter()


SHAREGPT4V_SPLITS = {"1k": 1000, "10k": 10_000}


def sharegpt4v(src: Path, split: str = "1k", images: Path | None = None) -> tuple[Items, Counter]:
    """ShareGPT4V (huggingface.co/datasets/Lin-Chen/ShareGPT4V): ``SRC`` is
    ``share-captioner_coco_lcs_sam_1246k_1107.json`` (or LoTLIP's resaved first 10k of it,
    ``share4v_sam_10k.json``), a list of ``{"image": PATH, "conversations": [human, gpt]}``; the
    caption is the second turn's ``value``. ``1k`` is its first 1000 entries (Long-CLIP's, which
    it held out of training), ``10k`` the first 10 000 (LoTLIP's). Image paths are relative to
    ``images`` (default: the JSON's folder)."""
    if split not in SHAREGPT4V_SPLITS:
        raise ConvertError(f"split must be one of {list(SHAREGPT4V_SPLITS)}, got {split!r}")
    entries = _read_json(src)
    if not isinstance(entries, list):
        raise ConvertError(f"{src}: expected a JSON list of ShareGPT4V entries")
    count = SHAREGPT4V_SPLITS[split]
    if len(entries) < count:
        raise ConvertError(f"{src}: {len(entries)} entries, fewer than the {count} of ShareGPT4V-{split}")
    root = images if images is not None else src.parent
    items = []
    for index, entry in enumerate(entries[:count]):
        where = f"{src} (entry {index})"
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ConvertError(f"{where}: expected an object with 'image' and 'conversations'")
        if not isinstance(turns, list) or len(turns) < 2 or not isinstance(turns[1], dict):
            raise ConvertError(f"{where}: 'conversations' needs the question and the caption turn")
        items.append(_item(root / entry["image"], _text(turns[1], "value", where)))
    return _checked(items, src), Counter()


DCI_SPLITS = ("all", "train", "valid", "test")


def dci(src: Path, caption: str = "full", split: str = "all") -> tuple[Items, Counter]:
    """DCI, Densely Captioned Images (github.com/facebookresearch/DCI, ``dci.tar.gz`` with the
    SA-1B ``sa_*.jpg`` photos added): ``SRC`` is ``densely_captioned_images/`` (or its parent)
    with ``splits.json`` (``{split: [annotation file names]}``), ``annotations/``, ``complete/``
    and ``photos/``.

    ``caption="full"``: ``short_caption + "\\n" + extra_caption`` from ``annotations/`` (DCI's
    "extended caption"), over all splits by default: what LoTLIP's dci_retrieval.py evaluates
    (FLAIR follows LoTLIP). ``caption="summary"``: the CLIP-length LLM summary of the whole
    description, ``complete/<file>["summaries"]["base"]`` (the first, if a list), as DCI's own
    summarised set; images without summaries are skipped and counted, as DCI's loader skips them.
    """
    if caption not in ("full", "summary"):
        raise ConvertError(f"caption must be 'full' or 'summary', got {caption!r}")
    if split not in DCI_SPLITS:
        raise ConvertError(f"split must be one of {DCI_SPLITS}, got {split!r}")
    base = src if (src / "splits.json").is_file() else src / "densely_captioned_images"
    splits = _read_json(base / "splits.json")
    if not isinstance(splits, dict) or not all(isinstance(v, list) for v in splits.values()):
        raise ConvertError(f"{base / 'splits.json'}: expected {{split: [annotation files]}}")
    if split != "all" and split not in splits:
        raise ConvertError(f"{base / 'splits.json'}: no split {split!r} (splits: {', '.join(splits)})")
    names = [n for s, files in splits.items() if split in ("all", s) for n in files]
    items, skipped = [], Counter()
    for name in names:
        folder = "annotations" if caption == "full" else "complete"
        path = base / folder / name
        entry = _read_json(path)
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise ConvertError(f"{path}: expected a DCI annotation with 'image'")
        if caption == "full":
            text = f"{_text(entry, 'short_caption', str(path))}\n{_text(entry, 'extra_caption', str(path))}"
        else:
            summary = (entry.get("summaries") or {}).get("base")
            summary = summary[0] if isinstance(summary, list) and summary else summary
            if not isinstance(summary, str) or not summary.strip():
                skipped["no_summary"] += 1
                continue
            text = summary.strip()
        items.append(_item(base / "photos" / entry["image"], text))
    return _checked(items, base), skipped


DOCCI_SPLITS = ("test", "train", "qual_dev", "qual_test")


def docci(src: Path, split: str = "test") -> tuple[Items, Counter]:
    """DOCCI (google.github.io/docci): ``SRC/docci_descriptions.jsonlines``, one
    ``{"example_id", "split", "image_file", "description"}`` a line, and ``SRC/images/`` from
    ``docci_images.tar.gz``. The ``test`` split (5000 images) is the retrieval set."""
    if split not in DOCCI_SPLITS:
        raise ConvertError(f"split must be one of {DOCCI_SPLITS}, got {split!r}")
    path = src / "docci_descriptions.jsonlines"
    items = []
    for number, entry in _read_jsonl(path):
        where = f"{path}:{number}"
        if entry.get("split") != split:
            continue
        if not isinstance(entry.get("image_file"), str):
            raise ConvertError(f"{where}: no 'image_file'")
        items.append(_item(src / "images" / entry["image_file"], _text(entry, "description", where)))
    return _checked(items, path), Counter()


# subset -> (folder under imageinwords/datasets, the image field, the images option naming its root)
IIW_SUBSETS = {
    "iiw-400": ("IIW-400", "image/key", "aar_images"),
    "dci-test": ("DCI_Test", "image", "dci_images"),
    "docci-test": ("DOCCI_Test", "image", "docci_images"),
}


def iiw(
    src: Path,
    subset: str = "iiw-400",
    *,
    aar_images: Path | None = None,
    dci_images: Path | None = None,
    docci_images: Path | None = None,
) -> tuple[Items, Counter]:
    """ImageInWords (github.com/google/imageinwords): ``SRC`` is its ``datasets/`` folder with
    ``IIW-400/``, ``DCI_Test/`` and ``DOCCI_Test/`` ``data.jsonl``; the caption is the human
    ``"IIW"`` description. IIW-400's ``"image/key"`` names a DOCCI AAR image (``aar_images``:
    DOCCI's ``images_aar/``), DCI_Test's ``"image"`` a DCI photo (``dci_images``: DCI's
    ``photos/``), DOCCI_Test's ``"image"`` a DOCCI image (``docci_images``: DOCCI's
    ``images/``). ``subset="all"`` is the three together, LoTLIP's iiw_retrieval.py set. A
    name without ``.jpg`` gets it; an AAR name not found with ``test`` is looked up with
    ``train`` instead, as LoTLIP's data_preprocess.py does."""
    if subset != "all" and subset not in IIW_SUBSETS:
        raise ConvertError(f"subset must be one of {[*IIW_SUBSETS, 'all']}, got {subset!r}")
    # LoTLIP's order for "all"
    chosen = ["docci-test", "iiw-400", "dci-test"] if subset == "all" else [subset]
    roots = {"aar_images": aar_images, "dci_images": dci_images, "docci_images": docci_images}
    items = []
    for name in chosen:
        folder, image_field, root_option = IIW_SUBSETS[name]
        root = roots[root_option]
        if root is None:
            raise ConvertError(f"IIW {name} needs its images: give --{root_option.replace('_', '-')}")
        path = src / folder / "data.jsonl"
        for number, entry in _read_jsonl(path):
            where = f"{path}:{number}"
            image = entry.get(image_field)
            if not isinstance(image, str) or not image:
                raise ConvertError(f"{where}: no {image_field!r}")
            image = image if image.endswith(".jpg") else f"{image}.jpg"
            if name == "iiw-400" and not (root / image).is_file():
                image = image.replace("test", "train")
            items.append(_item(root / image, _text(entry, "IIW", where)))
    return _checked(items, src), Counter()


CONVERTERS: dict[str, Callable[..., tuple[Items, Counter]]] = {
    "dci": dci,
    "urban1k": urban1k,
    "sharegpt4v": sharegpt4v,
    "docci": docci,
    "iiw": iiw,
}
