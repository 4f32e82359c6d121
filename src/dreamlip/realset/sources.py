"""The real pixels of the real-image development set: object cut-outs with exact masks and
background regions, all taken from photographs and scans that ship inside scikit-image's and
scikit-learn's wheels (nothing is downloaded).

Every source file is checked against the SHA-256 it had when this set was designed, so a package
release that re-encodes an image stops the generator with a one-line error instead of silently
changing the benchmark. How each mask is made (docs/real-data.md):

- ``flower``: a colour rule (the orange petals, holes filled);
- ``coin``: each coin of the Pompeii coins scan, thresholded after a light blur and closed by its
  convex hull; every fourth coin (in reading order) is kept for the test split;
- ``photographer``: the dark coat and camera of the cameraman photo (threshold, largest part);
- ``horse``: the clip-art silhouette itself;
- ``cat``, ``astronaut``, ``coffee cup``: a polygon traced around the cat's head, the astronaut's
  head and spacesuit, and the saucer and the cup's mouth (two ellipses), as COCO's annotators
  trace theirs;
- ``handwritten digit``: the whole 8x8 scan (ink on white paper); every fifth scan is kept for
  the test split.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
from dataclasses import dataclass
from importlib.resources import files

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull

__all__ = ["BACKGROUNDS", "CATEGORIES", "SOURCES", "Cutout", "backgrounds", "cutouts", "source_digests"]


@dataclass(frozen=True)
class Source:
    package: str  # the import name of the package whose wheel ships the file
    path: str  # inside that package
    sha256: str
    licence: str


SOURCES: dict[str, Source] = {
    "chelsea.png": Source("skimage", "data/chelsea.png",
                          "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
                          "CC0, photographer Stefan van der Walt"),
    "coffee.png": Source("skimage", "data/coffee.png",
                         "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
                         "CC0, photographer Rachel Michetti"),
    "coins.png": Source("skimage", "data/coins.png",
                        "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
                        "no known copyright restrictions (Brooklyn Museum)"),
    "horse.png": Source("skimage", "data/horse.png",
                        "c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455",
                        "CC0, Andreas Preuss (openclipart)"),
    "camera.png": Source("skimage", "data/camera.png",
                         "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
                         "CC0, photographer Lav Varshney"),
    "astronaut.png": Source("skimage", "data/astronaut.png",
                            "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
                            "public domain (NASA)"),
    "brick.png": Source("skimage", "data/brick.png",
                        "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
                        "CC0 (CC0Textures)"),
    "grass.png": Source("skimage", "data/grass.png",
                        "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
                        "CC0 (DeviantArt, linolafett)"),
    "gravel.png": Source("skimage", "data/gravel.png",
                         "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
                         "CC0 (CC0Textures)"),
    "hubble_deep_field.jpg": Source("skimage", "data/hubble_deep_field.jpg",
                                    "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
                                    "public domain (NASA)"),
    "page.png": Source("skimage", "data/page.png",
                       "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
                       "scikit-image's sample data, BSD-3-Clause"),
    "flower.jpg": Source("sklearn.datasets", "images/flower.jpg",
                         "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
                         "CC BY 2.0, vultilion (Flickr)"),
    "china.jpg": Source("sklearn.datasets", "images/china.jpg",
                        "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
                        "CC BY 2.0, danielbuechele (Flickr)"),
    "digits.csv.gz": Source("sklearn.datasets", "data/digits.csv.gz",
                            "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22",
                            "CC BY 4.0 (UCI optical recognition of handwritten digits)"),
}

# Object categories, in class-index order (classes.json), and the source of each.
CATEGORIES = ["cat", "coffee cup", "coin", "horse", "photographer", "flower", "handwritten digit", "astronaut"]
# Categories whose cut-out faces a side in its source photo; a mirrored copy faces the other.
FACING = {"horse": "right", "photographer": "right"}
# Background kinds: (source, box x0, y0, x1, y1 in source pixels, None = the whole image). Each
# box holds only that kind of surface, so any crop of it is truthfully named by the kind.
BACKGROUNDS: dict[str, tuple[str, tuple[int, int, int, int] | None]] = {
    "brick wall": ("brick.png", None),
    "grass": ("grass.png", None),
    "gravel": ("gravel.png", None),
    "night sky": ("hubble_deep_field.jpg", None),
    "wooden table": ("coffee.png", (485, 0, 600, 400)),
    "printed page": ("page.png", (0, 40, 384, 191)),
    "leaves": ("flower.jpg", (0, 0, 165, 400)),
    "sky": ("china.jpg", (340, 0, 640, 140)),
}
# Polygons traced on the source photos, (x, y) in source pixels.
CAT_OUTLINE = [(45, 0), (395, 0), (392, 40), (372, 110), (365, 190), (340, 250), (300, 300), (0, 300),
               (0, 110), (20, 40)]
ASTRONAUT_OUTLINE = [(195, 14), (262, 14), (298, 50), (302, 110), (285, 150), (305, 200), (312, 260),
                     (345, 290), (362, 330), (355, 360), (292, 400), (282, 512), (22, 512), (20, 305),
                     (55, 260), (112, 238), (115, 185), (152, 145), (152, 60)]
# The saucer and the cup's mouth as ellipses (cx, cy, semi-axes, tilt in radians) traced on coffee.png.
SAUCER_ELLIPSE = (278, 236, 200, 154, 0.2)
CUP_ELLIPSE = (292, 108, 119, 92)
HELD_OUT_COIN_EVERY = 4  # coin k (reading order) goes to the test split when k % 4 == 3
HELD_OUT_DIGIT_EVERY = 5  # digit scan i goes to the test split when i % 5 == 4
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class Cutout:
    """One object instance: RGB pixels and their mask, cropped to the mask's bounding box."""

    rgb: np.ndarray  # h x w x 3 uint8
    mask: np.ndarray  # h x w bool
    source: str  # "coins.png#3": the file and, where it holds several, which instance
    detail: str | None = None  # the digit a handwritten digit shows


def _read(name: str) -> bytes:
    source = SOURCES[name]
    try:
        data = files(source.package).joinpath(source.path).read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise OSError(f"the real-image set needs {source.path} from the {source.package} package: {err}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise OSError(f"{source.package}/{source.path} is not the file the real-image set was built from "
                      f"(sha256 {digest[:12]}, expected {source.sha256[:12]}): the set would not be the documented one")
    return data


def _image(name: str, mode: str = "RGB") -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(_read(name))).convert(mode))


def source_digests() -> dict[str, str]:
    """Every source file's SHA-256, after checking each one is there and unchanged."""
    for name in SOURCES:
        _read(name)
    return {name: source.sha256 for name, source in SOURCES.items()}


def _hsv(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("HSV")).astype(np.int32)


def _largest_part(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def _polygon_mask(shape: tuple[int, int], points) -> np.ndarray:
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(float, p)) for p in points], fill=1)
    return np.asarray(canvas).astype(bool)


def _convex_hull(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    points = np.stack([xs, ys], 1).astype(np.float64)
    hull = points[ConvexHull(points).vertices] + 0.5  # pixel centres
    return _polygon_mask(mask.shape, hull) | mask


def _crop(rgb: np.ndarray, mask: np.ndarray, source: str, detail: str | None = None) -> Cutout:
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return Cutout(np.ascontiguousarray(rgb[y0:y1, x0:x1]), np.ascontiguousarray(mask[y0:y1, x0:x1]), source, detail)


def _flower() -> Cutout:
    rgb = _image("flower.jpg")
    hsv = _hsv(rgb)
    orange = (hsv[..., 1] > 110) & (hsv[..., 2] > 120) & ((hsv[..., 0] < 30) | (hsv[..., 0] > 240))
    mask = _largest_part(ndimage.binary_opening(orange, iterations=2))
    return _crop(rgb, ndimage.binary_fill_holes(ndimage.binary_closing(mask, iterations=4)), "flower.jpg")


def _ellipse(cx: float, cy: float, a: float, b: float, angle: float = 0.0, points: int = 48) -> list[tuple[float, float]]:
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    c, s = np.cos(angle), np.sin(angle)
    return [(cx + a * np.cos(u) * c - b * np.sin(u) * s, cy + a * np.cos(u) * s + b * np.sin(u) * c) for u in t]


def _coffee_cup() -> Cutout:
    rgb = _image("coffee.png")
    mask = _polygon_mask(rgb.shape[:2], _ellipse(*SAUCER_ELLIPSE)) | _polygon_mask(rgb.shape[:2], _ellipse(*CUP_ELLIPSE))
    return _crop(rgb, mask, "coffee.png")


def _photographer() -> Cutout:
    gray = _image("camera.png", "L")
    dark = _largest_part(ndimage.binary_opening(gray < 60, iterations=1))
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(dark, iterations=3))
    return _crop(np.repeat(gray[..., None], 3, 2), mask, "camera.png")


def _horse() -> Cutout:
    rgba = _image("horse.png", "RGBA")
    mask = (rgba[..., :3].mean(-1) < 128) & (rgba[..., 3] >= 128)
    return _crop(rgba[..., :3], mask, "horse.png")


def _traced(name: str, outline) -> Cutout:
    rgb = _image(name)
    return _crop(rgb, _polygon_mask(rgb.shape[:2], outline), name)


def _coins() -> list[Cutout]:
    """Every whole coin of the scan, in reading order (rows of coins top to bottom, then x)."""
    gray = _image("coins.png", "L")
    bright = ndimage.binary_fill_holes(ndimage.gaussian_filter(gray.astype(np.float32), 1.5) > 110)
    labels, _ = ndimage.label(ndimage.binary_opening(bright, iterations=2))
    coins = []
    for index, box in enumerate(ndimage.find_objects(labels)):
        part = labels[box] == index + 1
        height, width = part.shape
        # a coin: coin-sized, round (fills its box as a disc does), not cut by the scan's edge
        if 800 <= part.sum() <= 4000 and part.mean() > 0.6 and 0.75 <= height / width <= 1.33:
            mask = np.zeros_like(bright)
            mask[box] = part
            coins.append(_convex_hull(mask))
    row_height = 60  # the scan's coins lie in 4 rows about 70 px apart
    coins.sort(key=lambda m: (int(np.nonzero(m)[0].mean() // row_height), float(np.nonzero(m)[1].mean())))
    rgb = np.repeat(gray[..., None], 3, 2)
    return [_crop(rgb, mask, f"coins.png#{k}") for k, mask in enumerate(coins)]


def _digits() -> list[tuple[int, Cutout]]:
    """(scan index, cut-out) of every 8x8 digit scan: ink (0..16 per cell) as grey on white paper."""
    with gzip.open(io.BytesIO(_read("digits.csv.gz")), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    out = []
    for index, row in enumerate(table):
        gray = (255 - np.round(row[:64].reshape(8, 8) * 255 / 16)).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, 2)
        out.append((index, Cutout(rgb, np.ones((8, 8), bool), f"digits.csv.gz#{index}", DIGIT_WORDS[int(row[64])])))
    return out


@functools.lru_cache(maxsize=None)
def cutouts(split: str) -> dict[str, tuple[Cutout, ...]]:
    """category -> its instances for ``split``: coins and digit scans are split between train and
    test (test images show instances no training image shows); each other category is one photo."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    test = split == "test"
    coins = [c for k, c in enumerate(_coins()) if (k % HELD_OUT_COIN_EVERY == HELD_OUT_COIN_EVERY - 1) == test]
    digits = [c for i, c in _digits() if (i % HELD_OUT_DIGIT_EVERY == HELD_OUT_DIGIT_EVERY - 1) == test]
    pools = {
        "cat": (_traced("chelsea.png", CAT_OUTLINE),),
        "coffee cup": (_coffee_cup(),),
        "coin": tuple(coins),
        "horse": (_horse(),),
        "photographer": (_photographer(),),
        "flower": (_flower(),),
        "handwritten digit": tuple(digits),
        "astronaut": (_traced("astronaut.png", ASTRONAUT_OUTLINE),),
    }
    assert list(pools) == CATEGORIES
    return pools


@functools.lru_cache(maxsize=None)
def backgrounds() -> dict[str, np.ndarray]:
    """background kind -> its region (RGB uint8; the grey textures as three equal channels)."""
    out = {}
    for kind, (name, box) in BACKGROUNDS.items():
        rgb = _image(name)
        if box is not None:
            x0, y0, x1, y1 = box
            rgb = rgb[y0:y1, x0:x1]
        out[kind] = np.ascontiguousarray(rgb)
    return out
