"""Evaluation dataset readers: every supported layout becomes one of three in-memory lists.

* :class:`ClassificationSet` (zero-shot classification, linear probe): an image folder
  (``ROOT/<class>/<image>``), our JSONL with ``"label"`` plus a classes file, or webdataset shards
  with ``.cls`` members.
* :class:`RetrievalSet`: records in any training layout (our JSONL, the authors' CSVs, parquet,
  img2dataset or Hugging Face webdataset shards) with their ``"texts"``, raw or long captions, a
  COCO/Flickr30k Karpathy-split JSON, or a long-caption set as JSON/JSONL of ``{image, caption}``.
* :class:`SegmentationSet`: our JSONL with ``"mask"`` plus a classes file, or a VOC/Context-style
  folder (``JPEGImages/`` + ``SegmentationClass/`` PNG label maps + a class list file).

Layouts are recognised, folders walked and tars indexed by ``dreamlip.formats``, as for every
command; a directory written by ``dreamlip demo-data`` is recognised by every reader. Images are
only listed here (paths, or offsets into an uncompressed tar); they are decoded when a task loads
them. A dataset that cannot be evaluated faithfully (no images, a label outside the class list,
an unreadable image) raises :class:`EvalDataError`: dropping samples silently would change the
benchmark.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreamlip.captions import caption_text
from dreamlip.data.records import Record, RecordTable, SchemaError, read_jsonl
from dreamlip.formats import (
    DEMO_CLASSES,
    IMAGE_EXTENSIONS,
    BadLine,
    TarMember,
    demo_split_file,
    demo_splits,
    detect_source,
    image_ext,
    index_tar,
    jsonl_objects,
    list_images,
    tar_paths,
)
from dreamlip.io import BadSample, decode_image, read_image_file
from dreamlip.model import load_open_clip

__all__ = [
    "ClassList",
    "ClassificationSet",
    "EvalDataError",
    "ImageSource",
    "RetrievalSet",
    "SegmentationSet",
    "RECORD_KINDS",
    "demo_split",
    "holds_records",
    "load_image",
    "load_mask",
    "read_classes",
    "read_classification",
    "read_linear_probe",
    "read_records",
    "read_retrieval",
    "read_segmentation",
    "read_templates",
]


class EvalDataError(ValueError):
    """An evaluation dataset is missing, malformed, or inconsistent with its class list."""


ImageSource = str | TarMember
Templates = list[str] | dict[str, list[str]]


@dataclass
class ClassificationSet:
    images: list[ImageSource]
    labels: list[int]
    classnames: list[str]
    templates: Templates | None  # the dataset's own prompts, if it ships any
    source: str


@dataclass
class RetrievalSet:
    images: list[ImageSource]
    texts: list[list[str]]  # texts[i]: the captions of images[i] (at least one each)
    source: str


@dataclass
class SegmentationSet:
    images: list[ImageSource]
    masks: list[str]
    classnames: list[str]  # mask value k is classnames[k]
    ignore_index: int
    templates: Templates | None
    source: str


# ---------------------------------------------------------------------------------------------
# Images and masks


def load_image(source: ImageSource) -> Image.Image:
    """Decode one image to RGB; an unreadable image is an error here, not a skipped sample."""
    try:
        return decode_image(source.read() if isinstance(source, TarMember) else read_image_file(source))
    except BadSample as err:
        raise EvalDataError(f"{source}: {err}") from None


def load_mask(path: str, num_classes: int, ignore_index: int) -> np.ndarray:
    """A single-channel label map as int64 ``[H, W]``, checked against the class list."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise EvalDataError(
                    f"{path}: a mask must be a single-channel label map (PNG mode L, P or I), got "
                    f"mode {image.mode}; colour-coded masks must be converted to class indices"
                )
            mask = np.asarray(image, dtype=np.int64)
    except (OSError, SyntaxError) as err:
        raise EvalDataError(f"{path}: unreadable mask ({err})") from None
    values = np.unique(mask)
    bad = values[(values != ignore_index) & ((values < 0) | (values >= num_classes))]
    if bad.size:
        raise EvalDataError(
            f"{path}: mask value(s) {bad.tolist()} outside the class list ({num_classes} classes, "
            f"values 0..{num_classes - 1}, ignore {ignore_index}); does the class list match the masks?"
        )
    return mask


# ---------------------------------------------------------------------------------------------
# Class names and prompt templates


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EvalDataError(f"{path}: not valid JSON ({err})") from None


def _builtin_templates(name: str) -> list[str] | None:
    load_open_clip()
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    # open_clip stores them as lambdas; calling one with "{}" gives the format string back.
    table = {"imagenet": OPENAI_IMAGENET_TEMPLATES, "imagenet-simple": SIMPLE_IMAGENET_TEMPLATES}
    return [t("{}") for t in table[name]] if name in table else None


def read_templates(spec: str | Sequence[str] | Mapping[str, Sequence[str]]) -> Templates:
    """Prompt templates: a list, ``"imagenet"`` (CLIP's 80), ``"imagenet-simple"`` (its 7), or a
    file: ``.txt`` one template per line, ``.json`` a list, or a ``{class name: [prompts]}`` dict
    (class-specific prompts, as CuPL). Templates hold ``{}`` or ``{c}`` where the name goes."""
    if isinstance(spec, Mapping):
        return {str(k): [str(p) for p in v] for k, v in spec.items()}
    if not isinstance(spec, str):
        templates = [str(t) for t in spec]
    elif (builtin := _builtin_templates(spec)) is not None:
        return builtin
    else:
        path = Path(spec)
        if not path.is_file():
            raise EvalDataError(f"{spec}: not a template file nor one of 'imagenet', 'imagenet-simple'")
        if path.suffix.lower() == ".json":
            data = _read_json(path)
            if isinstance(data, dict) and "templates" in data:
                data = data["templates"]
            if isinstance(data, dict):
                return read_templates(data)
            if not isinstance(data, list):
                raise EvalDataError(f"{path}: expected a JSON list of templates or a dict of prompts")
            templates = [str(t) for t in data]
        else:
            templates = [
                line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
            ]
    if not templates:
        raise EvalDataError(f"{spec}: no templates")
    for template in templates:
        if "{}" not in template and "{c}" not in template:
            raise EvalDataError(f"template {template!r} has no '{{}}' or '{{c}}' for the class name")
    return templates


@dataclass
class ClassList:
    names: list[str]
    templates: Templates | None = None  # the file's own prompts, if it has them
    ignore_index: int | None = None  # segmentation: the mask value that is not scored


def read_classes(spec: str | Sequence[str], section: str = "classification") -> ClassList:
    """Class names (and templates, ignore index, when the file has them) from a file or a list.

    Files: ``.txt`` one name per line; ``.json`` a list of names, ``{"names": [...],
    "templates": [...], "ignore_index": 255}``, or our ``classes.json`` (its ``section`` entry).
    ``"imagenet"`` is open_clip's 1000 ImageNet class names (in WordNet id order, as ImageNet
    folders sort).
    """
    if not isinstance(spec, str):
        classes = ClassList([str(n) for n in spec])
    elif spec == "imagenet":
        load_open_clip()
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return ClassList(list(IMAGENET_CLASSNAMES))
    elif not (path := Path(spec)).is_file():
        raise EvalDataError(f"{spec}: no such classes file")
    elif path.suffix.lower() != ".json":
        lines = path.read_text(encoding="utf-8").splitlines()
        classes = ClassList([line.strip() for line in lines if line.strip()])
    else:
        data = _read_json(path)
        if isinstance(data, dict) and section in data:
            data = data[section]
        if isinstance(data, list):
            classes = ClassList([str(n) for n in data])
        elif isinstance(data, dict) and isinstance(data.get("names"), list):
            templates = data.get("templates")
            classes = ClassList(
                [str(n) for n in data["names"]],
                read_templates(templates) if templates else None,
                data.get("ignore_index"),
            )
        else:
            raise EvalDataError(f"{path}: expected a list of class names or an object with 'names'")
    where = spec if isinstance(spec, str) else "class list"
    if not classes.names:
        raise EvalDataError(f"{where}: no class names")
    if len(set(classes.names)) != len(classes.names):
        raise EvalDataError(f"{where}: duplicate class names")
    return classes


def _names(classes: str | Sequence[str], section: str) -> tuple[list[str], Templates | None]:
    class_list = read_classes(classes, section)
    return class_list.names, class_list.templates


# ---------------------------------------------------------------------------------------------
# Our JSONL and the demo directory


def demo_split(root: str | Path, split: str) -> Path:
    """The JSONL file of a demo directory's ``split``."""
    jsonl = demo_split_file(root, split)
    if not jsonl.is_file():
        raise EvalDataError(f"{root}: no {jsonl.name} (splits here: {demo_splits(root)})")
    return jsonl


def _read_records(path: Path) -> RecordTable:
    try:
        table = read_jsonl(path)
    except SchemaError as err:
        raise EvalDataError(str(err)) from None
    if len(table) == 0:
        raise EvalDataError(f"{path}: no records")
    return table


def _label_index(label: Any, names: list[str], where: str) -> int:
    if isinstance(label, str):
        if label not in names:
            raise EvalDataError(f"{where}: label {label!r} is not in the class list")
        return names.index(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        return label
    raise EvalDataError(f"{where}: label {label!r} is not a class index 0..{len(names) - 1} or a class name")


def _jsonl_classification(path: Path, classes: str | Sequence[str] | None) -> ClassificationSet:
    if classes is None:
        raise EvalDataError(f"{path}: a JSONL dataset needs a classes file (--classes) naming its labels")
    names, templates = _names(classes, "classification")
    table = _read_records(path)
    images, labels = [], []
    for i in range(len(table)):
        record = table[i]
        where = f"{path} (record {record.key})"
        if "label" not in record.extras:
            raise EvalDataError(f"{where}: no 'label'")
        images.append(record.image)
        labels.append(_label_index(record.extras["label"], names, where))
    return ClassificationSet(images, labels, names, templates, str(path))


# ---------------------------------------------------------------------------------------------
# Classification: image folders and webdataset shards


def _folder_classification(root: Path, classes: str | Sequence[str] | None) -> ClassificationSet:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EvalDataError(f"{root}: no class folders (expected ROOT/<class>/<image>)")
    names = [p.name for p in folders]
    templates = None
    if classes is not None:
        names, templates = _names(classes, "classification")
        if len(names) != len(folders):
            raise EvalDataError(
                f"{root}: {len(folders)} class folders but the classes file names {len(names)} classes "
                "(names are matched to the folders in sorted order)"
            )
    images, labels = [], []
    for label, folder in enumerate(folders):
        files = list_images(folder)
        images += [str(p) for p in files]
        labels += [label] * len(files)
    if not images:
        raise EvalDataError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return ClassificationSet(images, labels, names, templates, str(root))


def _shard_paths(spec: str) -> list[Path]:
    try:
        return tar_paths(spec)
    except FileNotFoundError as err:
        raise EvalDataError(str(err)) from None


def _shard_classification(spec: str, classes: str | Sequence[str] | None) -> ClassificationSet:
    paths = _shard_paths(spec)
    if classes is None:
        # clip_benchmark's webdataset layout keeps classnames.txt next to (or above) the shards.
        found = [d / "classnames.txt" for d in (paths[0].parent, paths[0].parent.parent)]
        classes = next((str(p) for p in found if p.is_file()), None)
        if classes is None:
            raise EvalDataError(
                f"{spec}: shards need a classes file (--classes, or classnames.txt beside them)"
            )
    names, templates = _names(classes, "classification")
    images, labels = [], []
    for path in paths:
        for key, image, sample in _tar_samples(path, ("cls",)):
            if image is None or "cls" not in sample:
                raise EvalDataError(f"{path}: sample {key!r} lacks an image or a .cls member")
            cls = sample["cls"].decode().strip()
            try:
                label = int(cls)
            except ValueError:
                raise EvalDataError(f"{path}: sample {key!r} .cls is {cls!r}, not an integer") from None
            images.append(image)
            labels.append(_label_index(label, names, f"{path} (sample {key!r})"))
    if not images:
        raise EvalDataError(f"{spec}: no samples in the shards")
    return ClassificationSet(images, labels, names, templates, spec)


def read_classification(
    data: str | Path, *, classes: str | Sequence[str] | None = None, split: str = "test"
) -> ClassificationSet:
    """Images with class labels from a demo directory (its ``split``), an image folder (its
    ``split`` subfolder when there is one), a JSONL file, or shards (a directory of ``.tar``
    files or a brace pattern)."""
    path, kind = Path(data), detect_source(data)
    if kind == "demo":
        return _jsonl_classification(demo_split(path, split), classes or str(path / DEMO_CLASSES))
    if kind == "jsonl":
        return _jsonl_classification(path, classes)
    if kind == "shards":
        return _shard_classification(str(data), classes)
    if kind == "folder":
        return _folder_classification(path / split if (path / split).is_dir() else path, classes)
    raise EvalDataError(f"{data}: not a dataset directory, JSONL file or shard pattern")


def read_linear_probe(
    data: str | Path,
    *,
    train: str | Path | None = None,
    classes: str | Sequence[str] | None = None,
    split: str = "test",
    train_split: str = "train",
) -> tuple[ClassificationSet, ClassificationSet]:
    """The (train, test) pair: from ``train`` when given, else the dataset's own train split."""
    test = read_classification(data, classes=classes, split=split)
    path = Path(data)
    if train is None:
        has_split = detect_source(path) == "demo" or (path.is_dir() and (path / train_split).is_dir())
        if not has_split:
            raise EvalDataError(
                f"{data}: no {train_split!r} split here; name the training set (--train-data)"
            )
        train = data
    train_set = read_classification(train, classes=classes, split=train_split)
    if train_set.classnames != test.classnames:
        raise EvalDataError(f"{train}: its classes differ from {data}'s")
    return train_set, test


# ---------------------------------------------------------------------------------------------
# Retrieval


def _as_texts(value: Any, where: str) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise EvalDataError(f"{where}: texts must be a string or a list of strings")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise EvalDataError(f"{where}: no texts for this image")
    return texts


# What detect_source calls the layouts read as records (docs/data.md) rather than eval formats.
RECORD_KINDS = ("spec", "table", "shards")


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        yield from jsonl_objects(path)
    except BadLine as err:
        raise EvalDataError(str(err)) from None
    except OSError as err:
        raise EvalDataError(f"{path}: not readable ({err.strerror or err})") from None


def holds_records(path: str | Path) -> bool:
    """Whether a JSONL file holds records (docs/data.md: its first object has a "raw_caption")
    rather than the ``{image, caption}`` objects of a long-caption benchmark."""
    first = next(_json_lines(Path(path)), (0, None))[1]
    return isinstance(first, dict) and "raw_caption" in first


def read_records(data: str | Path) -> tuple[list[ImageSource], list[Record]]:
    """Every record of one training source (a SPEC item: ``cc3m.csv?urlmap=dl/``,
    ``parquet:pixelprose.parquet?images=...``, shards as a pattern or a folder of tars), each with
    its image: a local path, or the tar member of a shard sample. A record that a training run
    would skip (no image, a failed download, unreadable text) is an error here."""
    from dreamlip.data.shards import record_from_sample
    from dreamlip.data.spec import SpecError, open_source, parse_spec

    text = str(data)
    if Path(text).is_dir():
        text = f"wds:{text}"  # its tars are listed below, as formats.tar_paths lists a folder's
    try:
        specs = parse_spec(text)
    except SpecError as err:
        raise EvalDataError(f"{data}: {err}") from None
    if len(specs) != 1:
        raise EvalDataError(f"{data}: name one source, not a mix")
    spec = specs[0]
    if spec.kind != "wds":
        try:
            table = open_source(spec)
        except (SchemaError, SpecError, FileNotFoundError) as err:
            raise EvalDataError(str(err)) from None
        records = [table[i] for i in range(len(table))]
        images: list[ImageSource] = [r.image for r in records]  # type: ignore[misc]
    else:
        images, records = [], []
        for path in _shard_paths(spec.path):
            for _, member, sample in _tar_samples(path, ("json", "txt")):
                images.append(member)  # type: ignore[arg-type]
                records.append(record_from_sample(sample))
    for image, record in zip(images, records):
        if record.error is not None or image is None:
            raise EvalDataError(f"{data} (record {record.key}): {record.error or 'names no local image'}")
    if not records:
        raise EvalDataError(f"{data}: no records")
    return images, records


def _tar_samples(path: Path, read: Sequence[str]) -> Iterator[tuple[str, TarMember | None, dict[str, Any]]]:
    """A shard's samples: ``(key, its image as a member to seek, {"__key__", "__url__", and the
    members with extensions in ``read`` as bytes})``."""
    try:
        for key, members in index_tar(path):
            ext = image_ext(members)
            sample = {"__key__": key, "__url__": str(path), **{e: members[e].read() for e in read if e in members}}
            yield key, members[ext] if ext else None, sample
    except (tarfile.TarError, OSError) as err:
        raise EvalDataError(f"{path}: not a readable uncompressed tar ({err})") from None


def _record_texts(images: list[ImageSource], records: list[Record], source: str, texts: str) -> RetrievalSet:
    """Records' texts: ``texts="texts"`` (the records' "texts", else their raw caption), ``"raw"``
    (the raw caption), ``"long"`` (every captioner's long caption, one text each), or
    ``"long:NAME"`` (that captioner's long caption only)."""
    all_texts = []
    for record in records:
        where = f"{source} (record {record.key})"
        if texts in ("texts", "raw"):
            value = record.extras.get("texts") if texts == "texts" else None
            if isinstance(value, dict):  # {"source": [texts]}: every source's texts count
                value = [t for group in value.values() for t in _as_texts(group, where)]
            if value is None:
                value = record.raw_caption or []
        elif texts == "long" or texts.startswith("long:"):
            wanted = texts.partition(":")[2]
            value = [
                caption_text(c["long"]) for name, c in record.captions.items() if c.get("long") and wanted in ("", name)
            ]
        else:
            raise EvalDataError(f"texts={texts!r}: expected 'texts', 'raw', 'long' or 'long:CAPTIONER'")
        all_texts.append(_as_texts(value, where))
    return RetrievalSet(images, all_texts, source)


def _karpathy(path: Path, data: dict, images_root: Path, split: str) -> RetrievalSet:
    images, texts = [], []
    for entry in data["images"]:
        if entry.get("split") != split:
            continue
        where = f"{path} (image {entry.get('filename')!r})"
        if "filename" not in entry or not isinstance(entry.get("sentences"), list):
            raise EvalDataError(f"{where}: expected 'filename' and 'sentences'")
        # COCO entries carry a filepath (train2014/val2014); Flickr30k ones do not.
        images.append(str(images_root / entry.get("filepath", "") / entry["filename"]))
        texts.append(_as_texts([s["raw"] for s in entry["sentences"]], where))
    if not images:
        splits = sorted({str(e.get("split")) for e in data["images"]})
        raise EvalDataError(f"{path}: no images in split {split!r} (splits: {', '.join(splits)})")
    return RetrievalSet(images, texts, str(path))


def _image_caption_objects(path: Path, objects: list, images_root: Path) -> RetrievalSet:
    images, texts = [], []
    for n, obj in enumerate(objects, 1):
        where = f"{path} (item {n})"
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            raise EvalDataError(f"{where}: expected an object with 'image' and 'caption' (or 'texts')")
        value = obj.get("texts", obj.get("caption", obj.get("captions")))
        if value is None:
            raise EvalDataError(f"{where}: no 'caption' or 'texts'")
        images.append(str(images_root / obj["image"]))
        texts.append(_as_texts(value, where))
    if not images:
        raise EvalDataError(f"{path}: no images")
    return RetrievalSet(images, texts, str(path))


def read_retrieval(
    data: str | Path, *, images: str | Path | None = None, split: str = "test", texts: str = "texts"
) -> RetrievalSet:
    """Images with several captions each.

    * a demo directory or our JSONL (``texts``: see :func:`_record_texts`);
    * a Karpathy-split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``): the ``split``
      images, ``images`` the image root (default: the JSON's directory);
    * a long-caption set (DCI, Urban1k, ShareGPT4V-1k converted): JSON list or JSONL of
      ``{"image": PATH, "caption": TEXT}`` (or ``"texts": [...]``), paths relative to ``images``.
    """
    path, kind = Path(data), detect_source(data)
    if kind == "demo":
        data = demo_split(path, split)
        return _record_texts(*read_records(data), str(data), texts)
    if kind in RECORD_KINDS:
        return _record_texts(*read_records(data), str(data), texts)
    if not path.is_file():
        raise EvalDataError(f"{data}: no such retrieval dataset")
    root = Path(images) if images is not None else path.parent
    if kind == "jsonl":
        if holds_records(path):
            return _record_texts(*read_records(path), str(path), texts)
        return _image_caption_objects(path, [obj for _, obj in _json_lines(path)], root)
    obj = _read_json(path)
    if isinstance(obj, dict) and isinstance(obj.get("images"), list):
        return _karpathy(path, obj, root, split)
    if isinstance(obj, list):
        return _image_caption_objects(path, obj, root)
    raise EvalDataError(f"{path}: expected a Karpathy-split JSON ('images') or a list of {{image, caption}}")


# ---------------------------------------------------------------------------------------------
# Segmentation


def _voc_folder(root: Path, classes: str | Sequence[str] | None, split: str) -> SegmentationSet:
    if classes is None:
        found = [root / name for name in ("classes.json", "classes.txt", "labels.txt")]
        classes = next((str(p) for p in found if p.is_file()), None)
        if classes is None:
            raise EvalDataError(
                f"{root}: a VOC-style folder needs a class list (--classes, or classes.txt in it)"
            )
    class_list = read_classes(classes, "segmentation")
    list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if list_file.is_file():
        ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    else:
        ids = sorted(p.stem for p in (root / "SegmentationClass").glob("*.png"))
    images, masks = [], []
    for image_id in ids:
        mask = root / "SegmentationClass" / f"{image_id}.png"
        image = next(
            (p for ext in IMAGE_EXTENSIONS if (p := root / "JPEGImages" / f"{image_id}.{ext}").is_file()),
            None,
        )
        if image is None or not mask.is_file():
            raise EvalDataError(
                f"{root}: {image_id!r} lacks its image in JPEGImages/ or its mask in SegmentationClass/"
            )
        images.append(str(image))
        masks.append(str(mask))
    if not images:
        raise EvalDataError(f"{root}: no images with masks (JPEGImages/ + SegmentationClass/*.png)")
    return SegmentationSet(
        images, masks, class_list.names, _ignore(class_list), class_list.templates, str(root)
    )


def _jsonl_segmentation(path: Path, classes: str | Sequence[str] | None) -> SegmentationSet:
    if classes is None:
        raise EvalDataError(
            f"{path}: a JSONL dataset needs a classes file (--classes) naming the mask values"
        )
    class_list = read_classes(classes, "segmentation")
    table = _read_records(path)
    images, masks = [], []
    for i in range(len(table)):
        record = table[i]
        if "mask" not in record.extras:
            raise EvalDataError(f"{path} (record {record.key}): no 'mask'")
        images.append(record.image)
        masks.append(record.extras["mask"])
    return SegmentationSet(
        images, masks, class_list.names, _ignore(class_list), class_list.templates, str(path)
    )


def _ignore(class_list: ClassList) -> int:
    return 255 if class_list.ignore_index is None else int(class_list.ignore_index)


def read_segmentation(
    data: str | Path, *, classes: str | Sequence[str] | None = None, split: str = "test"
) -> SegmentationSet:
    """Images with label-map masks from a demo directory, our JSONL (``"mask"``), or a
    VOC/Context-style folder (ids from ``ImageSets/Segmentation/{split}.txt`` when present, else
    every mask). The ignore index comes from the classes file's ``ignore_index``, else 255."""
    path, kind = Path(data), detect_source(data)
    if kind == "demo":
        return _jsonl_segmentation(demo_split(path, split), classes or str(path / DEMO_CLASSES))
    if kind == "jsonl":
        return _jsonl_segmentation(path, classes)
    if path.is_dir() and (path / "SegmentationClass").is_dir():
        return _voc_folder(path, classes, split)
    raise EvalDataError(
        f"{data}: not a segmentation dataset "
        "(a demo directory, JSONL with masks, or JPEGImages/ + SegmentationClass/)"
    )
