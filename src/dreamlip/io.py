"""File handling shared by every command (dataset layouts are ``dreamlip.formats``'s).

- Safe image decoding with PIL (:func:`read_image_file`, :func:`decode_image`): every way an image
  can be bad becomes a :class:`BadSample` whose reason the callers count
  or record: ``missing_image``, ``empty_image``, ``corrupt_image``, ``truncated_image``,
  ``image_too_large`` (a decompression bomb by PIL's ``Image.MAX_IMAGE_PIXELS``: its warning
  above the limit is treated like its error above twice the limit, so the image is refused from
  its header, before any pixel is decoded). Any mode comes out as the 8-bit RGB a viewer shows.
- Atomic writes (:func:`atomic_write`): a reader sees the old file or the new one, never half; a
  full disk is one :class:`DiskFull` error naming the file.
- Exclusive locks across processes (:func:`file_lock`, ``flock`` on a lock file).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import io
import os
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "BadSample",
    "DiskFull",
    "atomic_write",
    "decode_image",
    "file_lock",
    "read_image_file",
    "remove_partial_writes",
    "to_rgb",
]

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_BACKGROUND = (255, 255, 255, 255)  # transparent pixels are shown on white, as a viewer would
_PARTIAL = ".tmp-"  # atomic_write's temporary files: ".<name>.tmp-<random>"


class BadSample(Exception):
    """One sample can't be used; ``reason`` is the key it is counted under (docs/data.md)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DiskFull(OSError):
    """A write ran out of space (ENOSPC) or quota (EDQUOT); the file it was replacing is intact."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` or an error it was raised while handling is ENOSPC / EDQUOT (torch.save
    reports a failed write as a RuntimeError about stream positions, the OSError as its context)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


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


def remove_partial_writes(directory: str | Path, name: str = "*") -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``directory`` for ``name`` (a glob;
    default: any file) when its process was killed mid-write. Only safe while no other process
    writes there. Returns what was removed."""
    stale = sorted(Path(directory).glob(f".{name}{_PARTIAL}*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def atomic_write(
    path: str | Path, write: Callable[[Any], None], *, binary: bool = False, locked: bool = False
) -> Path:
    """Write ``path`` by calling ``write(handle)`` on a temporary file beside it, fsync it and
    rename it into place (``os.replace`` is atomic on POSIX and Windows).

    A process killed at any moment leaves either the old file or the complete new one, plus a
    temporary file; a caller holding the lock on ``path`` (``locked``) removes those leftovers.
    Running out of space raises :class:`DiskFull` naming ``path``, the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if locked:
        remove_partial_writes(path.parent, glob.escape(path.name))
    tmp = path.with_name(f".{path.name}{_PARTIAL}{uuid.uuid4().hex[:12]}")
    try:
        # "x": a fresh file with the usual permissions (umask), never someone else's
        with open(tmp, "xb" if binary else "x", encoding=None if binary else "utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:
        if _out_of_space(err):
            raise DiskFull(f"no space left on device writing {path}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


@contextmanager
def file_lock(path: str | Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block; the
    kernel releases it if the process dies. Without ``wait``, raise :class:`BlockingIOError` at
    once when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
