"""Decode one image with PIL into RGB, turning every way an image can be bad into a BadSample.

Reasons (counted by the loader): ``missing_image``, ``empty_image``, ``corrupt_image``,
``truncated_image``, ``image_too_large`` (a decompression bomb by PIL's ``Image.MAX_IMAGE_PIXELS``:
its warning above the limit is treated like its error above twice the limit).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .records import BadSample

__all__ = ["IMAGE_EXTENSIONS", "decode_image", "read_image_file", "to_rgb"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_BACKGROUND = (255, 255, 255, 255)  # transparent pixels are shown on white, as a viewer would


def read_image_file(path: str | Path | None) -> bytes:
    """The encoded bytes of an image file; missing, unreadable or zero-byte files are bad samples."""
    if path is None:
        raise BadSample("missing_image", "the record names no image")
    try:
        data = Path(path).read_bytes()
    except OSError as err:  # absent, a directory, permission denied: no image to decode either way
        raise BadSample("missing_image", f"{path}: {err.strerror or err}") from None
    if not data:
        raise BadSample("empty_image", str(path))
    return data


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, keeping what the image shows.

    PIL's own ``convert("RGB")`` clips 16-bit greyscale at 255 (a near-white image) and drops
    alpha (showing whatever colour transparent pixels happen to store), so both are handled here.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _SIXTEEN_BIT:
        levels = np.asarray(image, dtype=np.float64) / 257.0  # 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, _BACKGROUND)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, *, draft: int | None = None) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, applying EXIF orientation.

    ``draft``: for JPEGs, let the decoder downscale by a power of two while both sides stay at
    least this size (a large speed-up when training at 224 px on multi-megapixel photos).
    Raises :class:`BadSample` for anything that can't be decoded.
    """
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only; the size check runs here
            if draft is not None:
                image.draft("RGB", (draft, draft))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("image_too_large", str(err)) from None
    except UnidentifiedImageError as err:
        raise BadSample("corrupt_image", str(err)) from None
    except OSError as err:
        reason = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
        raise BadSample(reason, str(err)) from None
    except Exception as err:  # PIL's format plugins raise SyntaxError, ValueError, struct.error...
        raise BadSample("corrupt_image", f"{type(err).__name__}: {err}") from None
