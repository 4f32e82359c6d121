"""Decode and check one image before a model sees it.

Every image is fully decoded here, so a corrupt or truncated file fails with a reason for that image
alone instead of failing a whole batch inside a processor or on a server.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

__all__ = ["ImageError", "PreparedImage", "prepare_image"]

# Formats every OpenAI-compatible server accepts as a data URL; anything else is re-encoded as PNG.
_PASSTHROUGH = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


class ImageError(ValueError):
    """An image that cannot be used; the message is the reason recorded for it."""


@dataclass(frozen=True)
class PreparedImage:
    """A decoded RGB image plus the encoded bytes to send to a server."""

    pil: Image.Image
    data: bytes
    mime: str


def prepare_image(data: bytes, *, max_side: int = 0) -> PreparedImage:
    """Decode ``data`` to RGB, shrinking it so its longer side is at most ``max_side`` (0: keep).

    Raises :class:`ImageError` with a short reason when the bytes are not a usable image.
    """
    if not data:
        raise ImageError("empty image file")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            fmt = opened.format
            opened.load()
            image = opened.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"cannot decode image: {err}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError(f"image has no pixels ({image.width}x{image.height})")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        fmt = None  # the original bytes no longer match: re-encode
    if fmt in _PASSTHROUGH:
        return PreparedImage(image, data, _PASSTHROUGH[fmt])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return PreparedImage(image, buffer.getvalue(), "image/png")
