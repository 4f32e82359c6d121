"""The embedded synthetic long-caption dataset (``dreamlip demo-data``).

Procedural scenes (64 px by default): 2 to 4 objects, each with a shape (8), colour (8; each shape
has a typical one, worn with probability ``TYPICAL_COLOR_P``), size (3),
texture (solid / striped / dotted) and position (3x3 grid), on a background of one of four kinds
(plain, gradient, checkered, cloudy) in a light or dark tone, with pixel noise. Objects may
overlap (later ones occlude earlier ones; every object keeps at least half of itself visible) and
the masks are exact (hard edges, no anti-aliasing). Text: a thin, noisy alt-text raw caption, a
short and a long caption from each of three simulated captioners, and for test images 3 to 5
held-out "human" captions. See :mod:`dreamlip.synthetic.text` and ``docs/demo-data.md``.

Output layout (paths in records are relative to the JSONL file)::

    OUT_DIR/
      train.jsonl, test.jsonl      one image per line (schema below)
      images/{train,test}/NNNNNN.png   RGB, image_size x image_size
      masks/{train,test}/NNNNNN.png    8-bit label map over segmentation classes:
                                       0 = background, 1..8 = shape class + 1 (classes.json
                                       "segmentation.names"), 255 = ignore (reserved, unused)
      classes.json                 class names and zero-shot prompt templates (held-out style)
      meta.json                    generator version, seed, sizes, captioner names

Record schema::

    {"id": "train-000000",
     "image": "images/train/000000.png",
     "raw_caption": "Pink square on light background hd",   # alt-text: at most one object
     "captions": {"IB":  {"short": "...", "long": "..."},   # long: 4-9 sentences
                  "LLA": {"short": "...", "long": "..."},
                  "SV":  {"short": "...", "long": "..."}},
     "label": 4,             # classification: index (classes.json) of the shape of the object
                             # with the largest visible area (strictly >= 1.15x the runner-up)
     "mask": "masks/train/000000.png",
     "objects": [            # drawing order, back to front
        {"shape": "star", "color": "red", "size": "large", "texture": "striped",
         "position": "top left",          # 3x3 grid cell of the object's centre
         "bbox": [x0, y0, x1, y1],        # visible pixels, x1/y1 exclusive
         "mask_value": 5,                 # its pixels in the mask (= shape index + 1)
         "area": 187}, ...],              # visible pixels
     "background": {"kind": "checkered", "tone": "dark"},
     "texts": ["A red star next to a small blue ring.", ...]}   # test records only

Shapes within one image are distinct (so are colours), which makes the semantic mask also an
instance mask: ``mask == mask_value`` is exactly that object's visible pixels.

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i)``, so the
output is byte-identical for a given seed whatever the number of worker processes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from dreamlip.synthetic.text import (
    BG_KINDS,
    BG_TONES,
    CAPTIONERS,
    CLASSIFICATION_TEMPLATES,
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    ObjectDesc,
    SceneDesc,
    captioner_captions,
    human_captions,
    raw_caption,
)
from dreamlip.formats import demo_image_name, demo_mask_name
from dreamlip.synthetic import writer
from dreamlip.synthetic.writer import SPLITS

__all__ = ["GENERATOR_VERSION", "classes_spec", "generate", "make_record", "render_scene"]

GENERATOR_VERSION = "2.0"

COLOR_RGB = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (238, 218, 40),
    "green": (45, 165, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 75, 220),
    "purple": (135, 55, 190),
    "pink": (245, 125, 190),
}
SIZE_RADIUS = {"small": 0.095, "medium": 0.14, "large": 0.2}  # fraction of the image side
# Shapes are scaled to about the same area (2.5 r^2) so that no class is the largest object more
# often by construction; EXTENT bounds how far each reaches from its centre (in r, with rotation).
EXTENT = {
    "circle": 0.9,
    "square": 1.0,
    "triangle": 1.36,
    "diamond": 1.25,
    "star": 1.32,
    "cross": 1.12,
    "ring": 1.05,
    "heart": 1.1,
}
ROTATES = {"square", "triangle", "diamond", "star", "cross", "heart"}
MAX_ROT = math.radians(12)
MIN_VISIBLE_FRACTION = 0.5
MAIN_AREA_RATIO = 1.15
OBJECTS_PER_IMAGE = (2, 4)  # inclusive range
# Real categories come with typical looks (lemons are yellow, tomatoes red), and a small model
# learns an object's identity through them long before it learns silhouettes: a tiny ViT trained
# supervised on this set's label reaches 28 % (chance 12.5) in the demo's budget when colour says
# nothing about the shape (docs/demo-data.md). So each shape has a typical colour, which it takes
# with probability TYPICAL_COLOR_P when no other object in the image has that colour.
TYPICAL_COLOR = {
    "circle": "orange",
    "square": "blue",
    "triangle": "green",
    "diamond": "cyan",
    "star": "yellow",
    "cross": "red",
    "ring": "purple",
    "heart": "pink",
}
TYPICAL_COLOR_P = 0.6


# --------------------------------------------------------------------------------------------
# Shapes as inside-tests on normalised coordinates (u right, v down, unit = the object's radius)


def _shape_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return u * u + v * v <= 0.9**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "diamond":
        return np.abs(u) * 0.85 + np.abs(v) <= 1.05
    if shape == "triangle":
        s = 1.39
        u, v = u / s, (v - 0.14) / s
        h = math.sqrt(3) / 2
        return (v <= 0.5) & (h * u - 0.5 * v <= 0.5) & (-h * u - 0.5 * v <= 0.5)
    if shape == "star":
        rho = np.hypot(u, v)
        theta = np.arctan2(u, -v)  # 0 = up
        sector = 2 * math.pi / 5
        phi = np.abs(np.mod(theta, sector) - sector / 2)  # 0 at an inner vertex direction
        phi = sector / 2 - phi  # 0 at an outer point
        x, y = rho * np.cos(phi), rho * np.sin(phi)
        r_out, r_in = 1.3, 0.62
        x1, y1 = r_out, 0.0
        x2, y2 = r_in * math.cos(sector / 2), r_in * math.sin(sector / 2)
        # origin side of the edge outer->inner vertex
        cross = (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1)
        return cross >= 0
    if shape == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.36) & (b <= 1.05)) | ((b <= 0.36) & (a <= 1.05))
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.05**2) & (r2 >= 0.55**2)
    if shape == "heart":
        x, y = u * 1.2, -(v * 1.2) + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(shape)


def _texture_pattern(
    texture: str, dx: np.ndarray, dy: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray | None:
    """Boolean map of pixels drawn in the secondary colour (None for solid)."""
    if texture == "solid":
        return None
    if texture == "striped":
        width = max(2.0, size / 24)
        direction = int(rng.integers(4))
        t = [dy, dx, (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)][direction]
        return np.floor(t / width + rng.random()).astype(np.int64) % 2 == 1
    if texture == "dotted":
        period = max(5.0, size / 11)
        px = np.mod(dx + rng.random() * period, period) - period / 2
        py = np.mod(dy + rng.random() * period, period) - period / 2
        return px * px + py * py <= (0.23 * period) ** 2
    raise ValueError(texture)


def _secondary(rgb: np.ndarray) -> np.ndarray:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb * 0.45 if lum > 120 else rgb + (255 - rgb) * 0.6


# --------------------------------------------------------------------------------------------
# Backgrounds


def _background(kind: str, tone: str, size: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(170, 225) if tone == "light" else rng.uniform(25, 75)
    col = base + rng.uniform(-12, 12, size=3)
    img = np.empty((size, size, 3), np.float32)
    img[:] = col
    if kind == "plain":
        return img
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "gradient":
        a = rng.uniform(0, 2 * math.pi)
        ramp = ((xx - size / 2) * math.cos(a) + (yy - size / 2) * math.sin(a)) / size
        amp = rng.uniform(35, 60)
        return img + (amp * ramp)[..., None]
    if kind == "checkered":
        cell = size // int(rng.choice([4, 8]))
        checker = ((xx // cell + yy // cell) % 2) * 2 - 1
        return img + (rng.uniform(12, 22) * checker)[..., None]
    if kind == "cloudy":
        low = rng.normal(0, 1, size=(5, 5)).astype(np.float32)
        up = np.asarray(Image.fromarray(low, mode="F").resize((size, size), Image.BILINEAR))
        return img + (22 * up)[..., None]
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# Scenes


def _draw_colors(shapes: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Distinct colour indices for the objects: each takes its shape's typical colour with
    probability TYPICAL_COLOR_P if still free, else a uniformly drawn free colour."""
    free = list(range(len(COLORS)))
    colors = []
    for shape in shapes:
        typical = COLORS.index(TYPICAL_COLOR[SHAPES[shape]])
        if typical in free and rng.random() < TYPICAL_COLOR_P:
            pick = typical
        else:
            pick = free[int(rng.integers(len(free)))]
        free.remove(pick)
        colors.append(pick)
    return colors


def _try_scene(rng: np.random.Generator, size: int):
    n = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colors = _draw_colors(shapes, rng)
    sizes = rng.integers(0, len(SIZES), size=n)
    textures = rng.integers(0, len(TEXTURES), size=n)
    cells = rng.choice(9, size=n, replace=False)
    bg_kind = BG_KINDS[int(rng.integers(len(BG_KINDS)))]
    bg_tone = BG_TONES[int(rng.integers(len(BG_TONES)))]

    img = _background(bg_kind, bg_tone, size, rng)
    seg = np.zeros((size, size), np.uint8)
    cell_w = size / 3
    placed = []
    for k in range(n):
        shape, size_name = SHAPES[shapes[k]], SIZES[sizes[k]]
        r = SIZE_RADIUS[size_name] * size
        row, col = divmod(int(cells[k]), 3)
        cx = (col + 0.5) * cell_w + rng.uniform(-0.2, 0.2) * cell_w
        cy = (row + 0.5) * cell_w + rng.uniform(-0.2, 0.2) * cell_w
        margin = EXTENT[shape] * r + 0.5
        cx = float(np.clip(cx, margin, size - margin))
        cy = float(np.clip(cy, margin, size - margin))
        angle = rng.uniform(-MAX_ROT, MAX_ROT) if shape in ROTATES else 0.0
        reach = EXTENT[shape] * r + 1
        x0, x1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)) + 1)
        y0, y1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)) + 1)
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx += 0.5 - cx
        dy += 0.5 - cy
        c, s = math.cos(angle), math.sin(angle)
        u = (c * dx + s * dy) / r
        v = (-s * dx + c * dy) / r
        inside = _shape_inside(shape, u, v)
        rgb = np.asarray(COLOR_RGB[COLORS[colors[k]]], np.float32) + rng.uniform(-18, 18, 3)
        pattern = _texture_pattern(TEXTURES[textures[k]], u * r, v * r, size, rng)
        patch = img[y0:y1, x0:x1]
        patch[inside] = rgb
        if pattern is not None:
            patch[inside & pattern] = _secondary(rgb)
        seg[y0:y1, x0:x1][inside] = shapes[k] + 1
        pos_row = min(2, int(cy // cell_w))
        pos_col = min(2, int(cx // cell_w))
        placed.append(
            dict(
                shape=shape,
                color=COLORS[colors[k]],
                size=size_name,
                texture=TEXTURES[textures[k]],
                position=POSITIONS[pos_row * 3 + pos_col],
                cx=cx,
                cy=cy,
                full_area=int(inside.sum()),
                mask_value=int(shapes[k] + 1),
            )
        )
    # Validity: everything at least half visible, one object clearly the largest.
    counts = np.bincount(seg.ravel(), minlength=len(SHAPES) + 1)
    areas = [int(counts[p["mask_value"]]) for p in placed]
    min_px = 10 * (size / 64) ** 2
    if any(a < MIN_VISIBLE_FRACTION * p["full_area"] or a < min_px for a, p in zip(areas, placed)):
        return None
    ranked = sorted(areas, reverse=True)
    if len(ranked) > 1 and ranked[0] < MAIN_AREA_RATIO * ranked[1]:
        return None
    img += rng.normal(0, 4, size=img.shape).astype(np.float32)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    objects = []
    for p, area in zip(placed, areas):
        ys, xs = np.nonzero(seg == p["mask_value"])
        p["area"] = area
        p["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        objects.append(p)
    return img, seg, objects, bg_kind, bg_tone


def render_scene(rng: np.random.Generator, image_size: int = 64):
    """Sample and draw one valid scene: ``(rgb uint8 HxWx3, mask uint8 HxW, objects, bg_kind,
    bg_tone)``. Invalid draws (an object mostly hidden, no clear largest object) are redrawn
    from the same generator, so the result is still a function of the generator's seed."""
    for _ in range(1000):
        out = _try_scene(rng, image_size)
        if out is not None:
            return out
    raise RuntimeError("could not sample a valid scene")  # pragma: no cover


def make_record(
    split: str, index: int, seed: int, image_size: int = 64
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Everything about image ``index`` of ``split``: ``(record, rgb, mask)``."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    img, seg, objects, bg_kind, bg_tone = render_scene(rng, image_size)
    scene = SceneDesc(
        objects=tuple(
            ObjectDesc(
                shape=o["shape"],
                color=o["color"],
                size=o["size"],
                texture=o["texture"],
                position=o["position"],
                cx=o["cx"],
                cy=o["cy"],
                area=o["area"],
            )
            for o in objects
        ),
        bg_kind=bg_kind,
        bg_tone=bg_tone,
        image_size=image_size,
    )
    main = scene.by_area[0]
    name = f"{index:06d}"
    record: dict[str, Any] = {
        "id": f"{split}-{name}",
        "image": demo_image_name(split, name),
        "raw_caption": raw_caption(scene, rng),
        "captions": captioner_captions(scene, list(CAPTIONERS), rng),
        "label": SHAPES.index(main.shape),
        "mask": demo_mask_name(split, name),
        "objects": [
            {k: o[k] for k in ("shape", "color", "size", "texture", "position", "bbox", "mask_value", "area")}
            for o in objects
        ],
        "background": {"kind": bg_kind, "tone": bg_tone},
    }
    if split == "test":
        record["texts"] = human_captions(scene, rng)
    return record, img, seg


def classes_spec() -> dict[str, Any]:
    """Contents of ``classes.json``."""
    return writer.classes_spec(
        SHAPES,
        CLASSIFICATION_TEMPLATES,
        kind="shape",
        attributes={
            "shape": list(SHAPES),
            "color": list(COLORS),
            "size": list(SIZES),
            "texture": list(TEXTURES),
            "position": list(POSITIONS),
            "background_kind": list(BG_KINDS),
            "background_tone": list(BG_TONES),
        },
    )



def _meta(*, seed: int, image_size: int, n_train: int, n_test: int) -> dict[str, Any]:
    """What ``meta.json`` records: the arguments and the generator's constants."""
    return {
        "generator": "dreamlip.synthetic",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "n_train": n_train,
        "n_test": n_test,
        "captioners": list(CAPTIONERS),
        "typical_color": {"rate": TYPICAL_COLOR_P, "colors": TYPICAL_COLOR},
        "captioner_error_rates": {
            k: {
                "miss": c.p_miss,
                "wrong_attribute": c.p_wrong,
                "wrong_position": c.p_wrong_pos,
                "hallucinate": c.p_hallucinate,
            }
            for k, c in CAPTIONERS.items()
        },
        "test_text_style": "human (held out: sentence frames never used by training text)",
        "label": "shape of the largest visible object (classes.json classification.names)",
        "mask": "0 background, 1..8 shape (classes.json segmentation.names), 255 ignore",
    }


generate = writer.dataset_generator(
    make_record,
    classes_spec,
    _meta,
    """Write the dataset to ``out_dir`` and return a summary dict.

    ``workers > 1`` renders in that many processes; the output does not depend on it. With
    ``reuse``, a complete set already there with the same ``meta.json`` is left untouched (summary
    ``"reused": True``), so processes reading it are never handed a half-rewritten file. Writers
    take turns on a lock file in ``out_dir``; ``meta.json`` is removed first and written last, so
    it marks a complete set.
    """,
)
