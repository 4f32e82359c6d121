"""The standard zero-shot segmentation suite, read from the layouts the sets ship in.

Eight benchmarks, as MaskCLIP, SCLIP, ClearCLIP and NACLIP tabulate them (``--seg-benchmark``):
``voc21``/``voc20`` (``VOCdevkit/VOC2012``: ``JPEGImages``, ``SegmentationClass`` palette PNGs,
``ImageSets/Segmentation/val.txt``), ``context60``/``context59`` (``VOCdevkit/VOC2010`` with
mmseg's ``SegmentationClassContext`` and ``ImageSets/SegmentationContext``), ``coco_stuff`` and
``coco_object`` (COCO-Stuff 164k ``stuffthingmaps_trainval2017``, or mmseg's converted
``*_instanceTrainIds.png`` for objects), ``ade20k`` (``ADEChallengeData2016``) and
``cityscapes`` (``leftImg8bit`` + ``gtFine`` ``*_labelIds.png``). docs/eval.md tabulates the
layouts, where they come from and the label conventions.

Raw label values are mapped through a lookup table when a mask is loaded; a value the table does
not know is an error naming the file. ``STANDARD`` holds the suite's settings per set
(``--seg-preset standard``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dreamlip.formats import IMAGE_EXTENSIONS

from .datasets import EvalDataError, SegmentationSet, load_mask

__all__ = ["BENCHMARKS", "STANDARD", "BenchmarkSet", "load_benchmark_mask", "read_benchmark"]

VOC = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CONTEXT = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door",
    "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain",
    "mouse", "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign",
    "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)  # fmt: skip
COCO_THINGS = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COCO_STUFF = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard", "carpet",
    "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood",
    "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad", "river",
    "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow",
    "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel",
    "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
# stuffthingmaps values (COCO category id - 1) of ids COCO never used: 12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91
COCO_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
ADE20K = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip
CITYSCAPES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
# cityscapesScripts' label id of each train id 0..18
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

IGNORE = 255
INVALID = -1  # a raw value the set never uses


@dataclass
class BenchmarkSet(SegmentationSet):
    """A segmentation set whose raw mask values go through ``lookup`` (``lookup[raw]``)."""

    lookup: np.ndarray | None = None
    benchmark: str = ""


def _table(pairs: dict[int, int], default: int) -> np.ndarray:
    table = np.full(256, default, dtype=np.int64)
    for raw, label in pairs.items():
        table[raw] = label
    return table


def _shift_out_zero(num_classes: int) -> np.ndarray:
    """0 -> ignore, k -> k - 1 for k in 1..num_classes (mmseg's reduce_zero_label)."""
    return _table({0: IGNORE, IGNORE: IGNORE, **{k: k - 1 for k in range(1, num_classes + 1)}}, INVALID)


def _identity(num_classes: int) -> np.ndarray:
    return _table({IGNORE: IGNORE, **{k: k for k in range(num_classes)}}, INVALID)


def _coco_stuff_table() -> np.ndarray:
    used = [v for v in range(182) if v not in COCO_UNUSED]
    return _table({IGNORE: IGNORE, **{raw: i for i, raw in enumerate(used)}}, INVALID)


def _coco_object_table() -> np.ndarray:
    things = [v for v in range(90) if v not in COCO_UNUSED]
    stuff = [v for v in range(91, 182) if v not in COCO_UNUSED]
    return _table({IGNORE: 0, **{raw: i + 1 for i, raw in enumerate(things)}, **dict.fromkeys(stuff, 0)}, INVALID)


def _find_image(directory: Path, stem: str) -> Path | None:
    return next((p for ext in IMAGE_EXTENSIONS if (p := directory / f"{stem}.{ext}").is_file()), None)


def _listed_pairs(root: Path, masks_dir: str, list_file: str) -> tuple[list[str], list[str]]:
    """VOC-style: ids from a list file, ``JPEGImages/<id>.*`` and ``<masks_dir>/<id>.png``."""
    listing = root / list_file
    if not listing.is_file():
        raise EvalDataError(f"{root}: no {list_file}")
    images, masks = [], []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        image, mask = _find_image(root / "JPEGImages", image_id), root / masks_dir / f"{image_id}.png"
        if image is None or not mask.is_file():
            raise EvalDataError(
                f"{listing}:{n}: {image_id!r} lacks its image in JPEGImages/ or its mask in {masks_dir}/"
            )
        images.append(str(image))
        masks.append(str(mask))
    return images, masks


def _paired_dirs(images_dir: Path, masks_dir: Path, mask_suffixes: tuple[str, ...], image_suffix: str = ""):
    """Every mask ``<stem><suffix>`` under ``masks_dir`` (recursively) with its image
    ``<stem><image_suffix>.*`` at the same relative place under ``images_dir``."""
    if not masks_dir.is_dir() or not images_dir.is_dir():
        raise EvalDataError(f"expected images in {images_dir} and label maps in {masks_dir}")
    images, masks = [], []
    for suffix in mask_suffixes:
        found = sorted(masks_dir.rglob(f"*{suffix}"))
        if not found:
            continue
        for mask in found:
            stem = mask.name[: -len(suffix)]
            image = _find_image(images_dir / mask.parent.relative_to(masks_dir), stem + image_suffix)
            if image is None:
                raise EvalDataError(f"{mask}: no image {stem}{image_suffix}.* in {images_dir}")
            images.append(str(image))
            masks.append(str(mask))
        return images, masks
    raise EvalDataError(f"{masks_dir}: no label maps (*{' or *'.join(mask_suffixes)})")


def _voc(root: Path, split: str):
    return _listed_pairs(root, "SegmentationClass", f"ImageSets/Segmentation/{split}.txt")


def _context(root: Path, split: str):
    return _listed_pairs(root, "SegmentationClassContext", f"ImageSets/SegmentationContext/{split}.txt")


def _coco_images(root: Path, split: str) -> Path:
    return root / "images" / split if (root / "images" / split).is_dir() else root / split


def _coco_stuff(root: Path, split: str):
    return _paired_dirs(_coco_images(root, split), root / "stuffthingmaps_trainval2017" / split, (".png",))


def _ade(root: Path, split: str):
    return _paired_dirs(root / "images" / split, root / "annotations" / split, (".png",))


def _cityscapes(root: Path, split: str):
    return _paired_dirs(
        root / "leftImg8bit" / split,
        root / "gtFine" / split,
        ("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"),
        image_suffix="_leftImg8bit",
    )


@dataclass(frozen=True)
class _Benchmark:
    classes: tuple[str, ...]
    split: str
    find: Callable[[Path, str], tuple[list[str], list[str]]]
    lookup: Callable[[str], np.ndarray]  # the table for a mask path


def _coco_object_lookup(path: str) -> np.ndarray:
    # mmseg's converted maps already hold 0 background, 1..80 things
    return _identity(81) if path.endswith("_instanceTrainIds.png") else _coco_object_table()


def _cityscapes_lookup(path: str) -> np.ndarray:
    if path.endswith("_labelTrainIds.png"):
        return _identity(19)
    return _table({label_id: i for i, label_id in enumerate(CITYSCAPES_LABEL_IDS)}, IGNORE)


def _coco_object_find(root: Path, split: str):
    converted = root / "annotations" / split
    if converted.is_dir() and any(converted.glob("*_instanceTrainIds.png")):
        return _paired_dirs(_coco_images(root, split), converted, ("_instanceTrainIds.png",))
    return _coco_stuff(root, split)


BENCHMARKS: dict[str, _Benchmark] = {
    "voc21": _Benchmark(("background", *VOC), "val", _voc, lambda _: _identity(21)),
    "voc20": _Benchmark(VOC, "val", _voc, lambda _: _shift_out_zero(20)),
    "context60": _Benchmark(("background", *CONTEXT), "val", _context, lambda _: _identity(60)),
    "context59": _Benchmark(CONTEXT, "val", _context, lambda _: _shift_out_zero(59)),
    "coco_stuff": _Benchmark((*COCO_THINGS, *COCO_STUFF), "val2017", _coco_stuff, lambda _: _coco_stuff_table()),
    "coco_object": _Benchmark(("background", *COCO_THINGS), "val2017", _coco_object_find, _coco_object_lookup),
    "ade20k": _Benchmark(ADE20K, "validation", _ade, lambda _: _shift_out_zero(150)),
    "cityscapes": _Benchmark(CITYSCAPES, "val", _cityscapes, _cityscapes_lookup),
}

# The suite's settings (SCLIP's and NACLIP's evaluation configs): the short side images are resized
# to, and for the sets with a background class a probability threshold at softmax scale 40.
STANDARD: dict[str, dict] = {
    "voc21": {"short_side": 336, "threshold": 0.1},
    "voc20": {"short_side": 336},
    "context60": {"short_side": 336, "threshold": 0.1},
    "context59": {"short_side": 336},
    "coco_object": {"short_side": 336, "threshold": 0.1},
    "coco_stuff": {"short_side": 448},
    "ade20k": {"short_side": 336},
    "cityscapes": {"short_side": 560},
}
STANDARD_LOGIT_SCALE = 40.0


def read_benchmark(name: str, root: str | Path, split: str | None = None) -> BenchmarkSet:
    """One of :data:`BENCHMARKS` from its root directory (``split``: default its validation split)."""
    if name not in BENCHMARKS:
        raise EvalDataError(f"unknown segmentation benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"{root}: no such directory (the {name} root)")
    images, masks = bench.find(root, split or bench.split)
    if not images:
        raise EvalDataError(f"{root}: no {name} images with label maps")
    set_ = BenchmarkSet(images, masks, list(bench.classes), IGNORE, None, str(root), benchmark=name)
    set_.lookup = bench.lookup(masks[0])
    return set_


def load_benchmark_mask(path: str, data: BenchmarkSet) -> np.ndarray:
    """A raw label map mapped to class indices (``ignore_index`` where the set ignores a pixel)."""
    raw = load_mask(path, 256, INVALID)  # any 8-bit value; the table decides
    mapped = data.lookup[raw]
    if (mapped == INVALID).any():
        bad = sorted(set(raw[mapped == INVALID].tolist()))
        raise EvalDataError(f"{path}: value(s) {bad[:10]} are not {data.benchmark} labels")
    return mapped
