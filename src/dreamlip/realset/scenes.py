"""Scenes of the real-image development set: real object cut-outs pasted onto real backgrounds.

Each image (64 px by default) is a square crop of one of 8 background photos or textures, with 1 to
3 objects of distinct categories pasted on it (:mod:`dreamlip.realset.sources`), each at one of
three sizes (by area, the same for every category), mirrored or not, in its own cell of the 3x3
grid, with a mild exposure change. Later objects occlude earlier ones; a scene is redrawn if an
object keeps less than half of itself visible or if the largest visible object is not at least
1.15x the runner-up. Every pixel is a real photo's or scan's (resampled); the masks are exactly the
pasted pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from dreamlip.realset.sources import (
    BACKGROUNDS,
    CATEGORIES,
    DIGIT_WORDS,
    FACING,
    SOURCES,
    Cutout,
    backgrounds,
    cutouts,
    source_digests,
)
from dreamlip.realset.text import (
    CAPTIONERS,
    CLASSIFICATION_TEMPLATES,
    RAW_CAPTION_RATES,
    HUMAN_TEMPLATES,
    Scene,
    Thing,
    captioner_captions,
    human_noun_phrase,
    raw_caption,
)
from dreamlip.synthetic.text import POSITIONS, SIZES, human_captions
from dreamlip.formats import demo_image_name, demo_mask_name
from dreamlip.synthetic import writer
from dreamlip.synthetic.writer import SPLITS

__all__ = ["GENERATOR_VERSION", "classes_spec", "generate", "make_record"]

GENERATOR_VERSION = "1.0"
OBJECT_COUNTS = {1: 0.25, 2: 0.45, 3: 0.30}  # objects per image and their probabilities
# An object's area (its mask's pixels) as a fraction of the image's, whatever its category, so every
# category is the largest object about equally often (a horse silhouette fills less of its box than
# a coin); scaled by a factor drawn in [1 - j, 1 + j].
SIZE_AREA = {"small": 0.06, "medium": 0.12, "large": 0.22}
SIZE_JITTER = 0.15
EXPOSURE = (0.85, 1.15)  # each object's pixels are multiplied by a factor drawn in this range
BACKGROUND_CROP = (0.5, 1.0)  # square crops, side a fraction of the background region's shorter side
MIN_VISIBLE_FRACTION = 0.5
MAIN_AREA_RATIO = 1.15


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    region = backgrounds()[kind]
    height, width = region.shape[:2]
    side = int(rng.uniform(*BACKGROUND_CROP) * min(height, width))
    y = int(rng.integers(height - side + 1))
    x = int(rng.integers(width - side + 1))
    crop = Image.fromarray(region[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop, dtype=np.float32)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out


def _resample(cut: Cutout, area: float, mirror: bool, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The cut-out scaled to cover about ``area`` pixels, no larger than the image: (float RGB, bool
    mask). Colours are resampled premultiplied by the mask, so no pixel of the source photo outside
    the mask leaks in."""
    rgb, mask = cut.rgb, cut.mask
    if mirror:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    height, width = mask.shape
    scale = min((area / mask.sum()) ** 0.5, image_size / max(height, width))
    new = (max(1, round(width * scale)), max(1, round(height * scale)))

    def resize(channel: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(np.ascontiguousarray(channel, np.float32), "F").resize(new, Image.BILINEAR))

    alpha = resize(mask.astype(np.float32))
    inside = alpha >= 0.5
    colour = np.stack([resize(rgb[..., c] * mask) for c in range(3)], -1)
    colour[inside] /= alpha[inside][:, None]
    return colour, inside


def _try_scene(rng: np.random.Generator, size: int, pools: dict[str, tuple[Cutout, ...]]):
    counts = list(OBJECT_COUNTS)
    n = int(rng.choice(counts, p=[OBJECT_COUNTS[c] for c in counts]))
    categories = rng.choice(len(CATEGORIES), size=n, replace=False)
    sizes = rng.integers(0, len(SIZES), size=n)
    cells = rng.choice(9, size=n, replace=False)
    kind = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    img = _background(kind, size, rng)
    seg = np.zeros((size, size), np.uint8)
    cell = size / 3
    placed = []
    for k in range(n):
        category, size_name = CATEGORIES[categories[k]], SIZES[sizes[k]]
        pool = pools[category]
        cut = pool[int(rng.integers(len(pool)))]
        mirror = bool(rng.random() < 0.5)
        area = SIZE_AREA[size_name] * size * size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
        colour, inside = _resample(cut, area, mirror, size)
        colour *= rng.uniform(*EXPOSURE)
        height, width = inside.shape
        row, col = divmod(int(cells[k]), 3)
        cx = (col + 0.5) * cell + rng.uniform(-0.2, 0.2) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.2, 0.2) * cell
        x0 = int(np.clip(round(cx - width / 2), 0, size - width))
        y0 = int(np.clip(round(cy - height / 2), 0, size - height))
        img[y0:y0 + height, x0:x0 + width][inside] = colour[inside]
        seg[y0:y0 + height, x0:x0 + width][inside] = categories[k] + 1
        cx, cy = x0 + width / 2, y0 + height / 2
        detail = None
        if cut.detail is not None:
            detail = cut.detail
        elif category in FACING:  # a mirrored cut-out faces the other way
            detail = FACING[category] if not mirror else ("left" if FACING[category] == "right" else "right")
        placed.append(dict(
            category=category, size=size_name,
            position=POSITIONS[min(2, int(cy // cell)) * 3 + min(2, int(cx // cell))],
            cx=cx, cy=cy, full_area=int(inside.sum()), mask_value=int(categories[k] + 1),
            source=cut.source, mirrored=mirror, detail=detail,
        ))
    visible = np.bincount(seg.ravel(), minlength=len(CATEGORIES) + 1)
    areas = [int(visible[p["mask_value"]]) for p in placed]
    min_px = 10 * (size / 64) ** 2
    if any(a < MIN_VISIBLE_FRACTION * p["full_area"] or a < min_px for a, p in zip(areas, placed)):
        return None
    ranked = sorted(areas, reverse=True)
    if len(ranked) > 1 and ranked[0] < MAIN_AREA_RATIO * ranked[1]:
        return None
    for p, area in zip(placed, areas):
        ys, xs = np.nonzero(seg == p["mask_value"])
        p["area"] = area
        p["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), seg, placed, kind


def make_record(split: str, index: int, seed: int, image_size: int = 64) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Everything about image ``index`` of ``split``: ``(record, rgb, mask)``. Invalid draws are
    redrawn from the same generator, so the result depends only on ``(seed, split, index)``."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    pools = cutouts(split)
    for _ in range(1000):
        scene = _try_scene(rng, image_size, pools)
        if scene is not None:
            break
    else:  # pragma: no cover
        raise RuntimeError("could not sample a valid scene")
    img, seg, placed, kind = scene
    desc = Scene(
        objects=tuple(Thing(p["category"], p["size"], p["position"], p["detail"], p["cx"], p["cy"], p["area"])
                      for p in placed),
        background=kind,
        image_size=image_size,
    )
    name = f"{index:06d}"
    objects = []
    for p in placed:
        obj = {k: p[k] for k in ("category", "size", "position", "bbox", "mask_value", "area", "source", "mirrored")}
        if p["category"] == "handwritten digit":
            obj["digit"] = DIGIT_WORDS.index(p["detail"])
        elif p["detail"] is not None:
            obj["facing"] = p["detail"]
        objects.append(obj)
    record: dict[str, Any] = {
        "id": f"{split}-{name}",
        "image": demo_image_name(split, name),
        "raw_caption": raw_caption(desc, rng),
        "captions": captioner_captions(desc, list(CAPTIONERS), rng),
        "label": CATEGORIES.index(desc.by_area[0].category),
        "mask": demo_mask_name(split, name),
        "objects": objects,
        "background": {"kind": kind, "source": BACKGROUNDS[kind][0]},
    }
    if split == "test":
        record["texts"] = human_captions(desc, rng, templates=HUMAN_TEMPLATES, describe=human_noun_phrase)
    return record, img, seg


def classes_spec() -> dict[str, Any]:
    """Contents of ``classes.json``."""
    return writer.classes_spec(
        CATEGORIES,
        CLASSIFICATION_TEMPLATES,
        kind="category",
        attributes={
            "category": list(CATEGORIES),
            "size": list(SIZES),
            "position": list(POSITIONS),
            "background": list(BACKGROUNDS),
            "digit": list(range(10)),
            "facing": ["left", "right"],
        },
    )


def _meta(*, seed: int, image_size: int, n_train: int, n_test: int) -> dict[str, Any]:
    """What ``meta.json`` records: the arguments, the generator's constants and its sources."""
    digests = source_digests()  # and stop here, before anything is written, if a source changed
    return {
        "generator": "dreamlip.realset",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test": n_test,
        "captioners": list(CAPTIONERS),
        "captioner_error_rates": {
            name: {
                "miss": c.p_miss,
                "misname": c.p_misname,
                "wrong_size": c.p_wrong_size,
                "wrong_detail": c.p_wrong_detail,
                "wrong_position": c.p_wrong_position,
                "hallucinate": c.p_hallucinate,
                "wrong_background": c.p_wrong_background,
            }
            for name, c in CAPTIONERS.items()
        },
        "raw_caption_rates": dict(RAW_CAPTION_RATES),
        "objects_per_image": {str(k): p for k, p in OBJECT_COUNTS.items()},
        "size_area": dict(SIZE_AREA),
        "sources": {name: {"package": s.package, "path": s.path, "sha256": digests[name], "licence": s.licence}
                    for name, s in SOURCES.items()},
        "held_out_instances": "test images show coins and digit scans no training image shows",
        "test_text_style": "human (held out: sentence frames never used by training text)",
        "label": "category of the largest visible object (classes.json classification.names)",
        "mask": "0 background, 1..8 category (classes.json segmentation.names), 255 ignore",
    }


generate = writer.dataset_generator(
    make_record,
    classes_spec,
    _meta,
    """Write the real-image development set to ``out_dir`` and return a summary dict; the same
    arguments, layout, determinism, ``workers`` and ``reuse`` as :func:`dreamlip.synthetic.generate`.""",
)
