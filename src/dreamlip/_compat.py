"""Make torchvision importable next to a CPU-only torch.

PyPI's torchvision wheel is built against CUDA torch; with the CPU torch its ``_C`` extension
fails to load, and ``import torchvision`` then dies registering fake kernels for
``torchvision::nms`` / ``torchvision::qnms`` whose schemas only ``_C`` defines. Defining those two
schemas ourselves lets the pure-Python parts (transforms, models) import; torchvision's C ops and
``torchvision.io`` stay unavailable, which is why images are decoded with PIL throughout.

This is applied only after a real import has failed that way: a working torchvision is left alone.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from typing import Any

_MISSING_OP = "torchvision::nms does not exist"
_library = None  # keeps the schema definitions alive for the process


def ensure_torchvision() -> None:
    """Import torchvision, defining its missing op schemas first when its C extension can't load."""
    global _library
    if "torchvision" in sys.modules:  # a failed import leaves no entry behind
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as err:
        if _MISSING_OP not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


class PortableTransform:
    """A torchvision transform that unpickles in a fresh process: a DataLoader worker started by
    spawn or forkserver (macOS, Python 3.14's default, a ``dreamlip demo --ranks`` process) loads
    its dataset before anything has run :func:`ensure_torchvision`, and unpickling the transform
    imports torchvision. It travels as bytes, loaded after ``ensure_torchvision``."""

    def __init__(self, transform: Callable[[Any], Any]):
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        return self.transform(image)

    def __reduce__(self):
        return _load_portable_transform, (pickle.dumps(self.transform),)


def _load_portable_transform(data: bytes) -> PortableTransform:
    ensure_torchvision()
    return PortableTransform(pickle.loads(data))
