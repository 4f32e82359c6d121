"""One served model: loading it (a dreamlip checkpoint or an open_clip export), and what the page
shows of it: query embeddings, sub-caption grouping heatmaps and zero-shot segmentation maps."""

from __future__ import annotations

import inspect
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreamlip.eval.encode import EvalContext, encode_texts
from dreamlip.eval.segmentation import Segmenter
from dreamlip.losses import group_patches

__all__ = ["DENSE_READOUTS", "ServedModel", "center_square", "dense_supported", "load_served_model"]

# The dense read-outs eval's segmentation offers when its Segmenter takes ``dense``.
DENSE_READOUTS = ("raw", "maskclip", "sclip", "clearclip", "naclip")
SEGMENTERS_KEPT = 8  # class lists whose prompt embeddings stay cached, per model


def dense_supported() -> bool:
    return "dense" in inspect.signature(Segmenter).parameters


def center_square(image: Image.Image) -> tuple[int, int, int, int]:
    """The box ``(left, top, right, bottom)`` of the image's central square: the region a heatmap
    covers (the model's eval transform crops it too, after resizing the short side)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return left, top, left + side, top + side


class ServedModel:
    def __init__(self, name: str, path: str | os.PathLike, model: Any, transform: Any, tokenizer: Any, device: str):
        self.name = name
        self.path = Path(path)
        self.model = model.eval()
        self.ctx = EvalContext(model, tokenizer, transform, torch.device(device), progress=False)
        # One search or heatmap at a time per model: no oversubscribed CPU. Segmentation does not
        # take it: it runs in its own lane (serve.app), so a search never waits behind one.
        self.lock = threading.Lock()
        self._segmenters: OrderedDict[tuple, Segmenter] = OrderedDict()

    @property
    def image_size(self) -> Any:
        return getattr(self.model.clip.visual, "image_size", None)

    @torch.no_grad()
    def encode_text(self, text: str) -> np.ndarray:
        """``[1, D]``; a query longer than the text context is the mean of its sentences."""
        with self.lock:
            embedding, _ = encode_texts(self.ctx, [text], long_text="sentences")
        return embedding.numpy()

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> np.ndarray:
        """``[1, D]``, from the eval transform as the collection's embeddings are."""
        with self.lock:
            pixels = self.ctx.transform(image)[None].to(self.ctx.device)
            embedding, _ = self.model.encode_image(pixels)
        return embedding.float().cpu().numpy()

    @torch.no_grad()
    def heatmaps(self, image: Image.Image, texts: Sequence[str]) -> np.ndarray:
        """Grouping weights ``[T, rows, cols]`` of each text over the patches of the image's central
        square: :func:`dreamlip.losses.group_patches`' weights (thresholded, each map sums to 1)."""
        visual = self.model.clip.visual
        with self.lock:
            pixels = self.ctx.transform(image.crop(center_square(image)))[None].to(self.ctx.device)
            _, patches = self.model.encode_image(pixels, with_patches=True)
            tokens = self.ctx.tokenizer(list(texts)).to(self.ctx.device)
            text_emb = self.model.encode_text(tokens)[None]
            _, weights = group_patches(text_emb, patches)
        rows, cols = visual.grid_size
        return weights[0].float().cpu().numpy().reshape(len(texts), rows, cols)

    def segment(self, image: Image.Image, classnames: Sequence[str], dense: str | None = None, **options: Any) -> np.ndarray:
        """Zero-shot label map ``[H, W]`` (indices into ``classnames``) at the image's size. Not
        thread-safe (its cache of class lists): the server calls it from one thread."""
        return self._segmenter(tuple(classnames), dense, options)(image)

    def _segmenter(self, classnames: tuple[str, ...], dense: str | None, options: dict[str, Any]) -> Segmenter:
        key = (classnames, dense, tuple(sorted(options.items())))
        if key in self._segmenters:
            self._segmenters.move_to_end(key)
            return self._segmenters[key]
        if dense is not None:
            if not dense_supported():
                raise ValueError("this build's segmentation has no dense read-outs; leave 'dense' out")
            options = {**options, "dense": dense}
        ctx = self.ctx
        segmenter = Segmenter(
            self.model, ctx.tokenizer, ctx.transform, classnames, device=ctx.device, **options
        )
        self._segmenters[key] = segmenter
        if len(self._segmenters) > SEGMENTERS_KEPT:
            self._segmenters.popitem(last=False)
        return segmenter


def load_served_model(path: str | os.PathLike, name: str, device: str = "cpu") -> ServedModel:
    """A dreamlip checkpoint file, or a directory written by ``dreamlip export`` (open_clip's
    ``local-dir:`` layout)."""
    from dreamlip.loading import load_model

    loaded = load_model(path, device=device)
    return ServedModel(name, path, loaded.model, loaded.eval_transform, loaded.tokenizer, device)
