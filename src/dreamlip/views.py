"""Several views of one sample, for objectives that compare them (COSMOS, docs/method.md "COSMOS").

- :class:`MultiCropTransform`: an image -> 2 global crops and N local crops, DINO's multi-crop with
  the augmentations COSMOS uses (``src/open_clip/transform.py``, ``DataAugmentationMulticrop``).
- :class:`TextCropSampler`: a caption pool -> 2 global captions (1 to 5 random pool items each)
  and local captions (one item each), COSMOS's ``textcrop`` sampling (``src/training/data.py``).

Both are functions of (seed, epoch, sample key) only, so resumed runs, DDP ranks and dataloader
workers reproduce them: the transform draws from torch's default generator, which
:class:`dreamlip.data.loader.SampleLoader` seeds per sample before calling it, and the sampler from
its own generator seeded like :class:`dreamlip.captions.SubcaptionSampler`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dreamlip.captions import NoUsableTextError, SubcaptionSampler, caption_text, has_word, merge_items

if TYPE_CHECKING:
    from dreamlip.objectives import ViewNeeds

__all__ = ["GLOBAL_VIEWS", "MultiCropTransform", "TextCropSampler", "local_crop_size", "view_sampler_and_transform"]

GLOBAL_VIEWS = 2  # COSMOS's (and DINO's): the teacher sees these two
# COSMOS's sizes at a 224-pixel model: local crops are 96 pixels.
_REFERENCE_SIZE, _REFERENCE_LOCAL_SIZE = 224, 96
_TEXT_CROPS = 15  # the text crops' stream, apart from SubcaptionSampler's (seed, epoch, index)


def local_crop_size(image_size: int, patch_size: int) -> int:
    """COSMOS's 96 / 224 of the model's input, to a whole number of patches (at least one)."""
    patches = round(image_size * _REFERENCE_LOCAL_SIZE / _REFERENCE_SIZE / patch_size)
    return max(1, patches) * patch_size


class _GaussianBlur:
    """PIL's Gaussian blur with probability ``p``, radius uniform in ``radius`` (drawn from torch's generator)."""

    def __init__(self, p: float, radius: tuple[float, float]):
        self.p, self.radius = p, radius

    def __call__(self, image):
        from PIL import ImageFilter

        if float(torch.rand(())) > self.p:  # COSMOS's `random() <= p` applies
            return image
        low, high = self.radius
        return image.filter(ImageFilter.GaussianBlur(radius=low + (high - low) * float(torch.rand(()))))


class _Solarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, image):
        from PIL import ImageOps

        return ImageOps.solarize(image) if float(torch.rand(())) < self.p else image


def _rgb(image):
    return image.convert("RGB")


class MultiCropTransform:
    """An image -> ``(global [2, 3, S, S], local [N, 3, s, s])`` normalised tensors.

    COSMOS's multi-crop: global crops cover ``crop_scale..1`` of the image (its configs' 0.4),
    local crops ``0.05..crop_scale``; every crop is flipped half the time, colour-jittered
    (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1) with probability 0.8 and made grey
    with probability 0.2; the first global crop is always blurred, the second blurred with
    probability 0.1 and solarised with 0.2, each local crop blurred with probability 0.5.
    ``S`` is the model's input size, ``s`` :func:`local_crop_size` of it (96 at 224); the blur
    radius (0.1 to 2 pixels at 224) scales with ``S`` too, so a small model sees the same blur.
    """

    def __init__(
        self,
        image_size: int,
        local_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        local_crops: int = 6,
        crop_scale: float = 0.4,
    ):
        from torchvision import transforms as T

        if not 0.05 < crop_scale < 1:
            raise ValueError(f"the crop scale splits 0.05..1 into local and global crops: got {crop_scale}")
        if local_crops < 0:
            raise ValueError(f"local crops must be >= 0, got {local_crops}")
        self.local_crops, self.local_size = local_crops, local_size
        radius = (0.1 * image_size / _REFERENCE_SIZE, 2.0 * image_size / _REFERENCE_SIZE)
        jitter = [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        to_tensor = [T.ToTensor(), T.Normalize(mean, std)]

        def crop(size: int, scale: tuple[float, float]) -> list:
            return [T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC), _rgb]

        global_scale, local_scale = (crop_scale, 1.0), (0.05, crop_scale)
        self.global_views = (
            T.Compose([*crop(image_size, global_scale), *jitter, _GaussianBlur(1.0, radius), *to_tensor]),
            T.Compose([*crop(image_size, global_scale), *jitter, _GaussianBlur(0.1, radius), _Solarize(0.2), *to_tensor]),
        )
        self.local_view = T.Compose([*crop(local_size, local_scale), *jitter, _GaussianBlur(0.5, radius), *to_tensor])

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        global_views = torch.stack([view(image) for view in self.global_views])
        local_views = [self.local_view(image) for _ in range(self.local_crops)]
        if not local_views:
            return global_views, global_views.new_zeros(0, global_views.shape[1], self.local_size, self.local_size)
        return global_views, torch.stack(local_views)


def _draw(pool: Sequence[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` pool items: without repeats while the pool lasts, then the whole pool again as
    often as it fits and the rest without repeats (COSMOS's ``random_sample_from_list``)."""
    whole, rest = divmod(count, len(pool))
    return list(pool) * whole + [pool[i] for i in rng.choice(len(pool), size=rest, replace=False)]


@dataclass(frozen=True)
class TextCropSampler:
    """Draws the ``num_texts`` texts of one image from its caption pool: COSMOS's text crops.

    The pool is the raw caption and :meth:`SubcaptionSampler.pool` of the captions (the sentences
    of the long captions and the short captions, as ``captions.*`` configure it). Slots 0 and 1 are
    global captions, each 1 to ``max_global_items`` pool items joined; slots 2.. are local
    captions, one item each. Same interface as :class:`SubcaptionSampler`; the draw is a function
    of (seed, epoch, index) only.
    """

    pool_sampler: SubcaptionSampler
    num_texts: int = 8
    max_global_items: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_texts < GLOBAL_VIEWS + 1:
            raise ValueError(f"text crops need 2 global captions and at least one local one: got {self.num_texts} texts")

    def sample(
        self,
        raw_caption: str | None,
        captions: Mapping[str, Mapping[str, Any]] | None,
        *,
        index: int,
        epoch: int = 0,
    ) -> list[str]:
        raw = caption_text(raw_caption).strip()
        pool = ([raw] if has_word(raw) else []) + self.pool_sampler.pool(captions)
        if not pool:
            raise NoUsableTextError("no raw caption and no generated caption with a sentence")
        rng = np.random.default_rng((self.seed, _TEXT_CROPS, epoch, index))
        global_captions = [merge_items(_draw(pool, int(rng.integers(1, self.max_global_items + 1)), rng)) for _ in range(GLOBAL_VIEWS)]
        return global_captions + _draw(pool, self.num_texts - GLOBAL_VIEWS, rng)


def view_sampler_and_transform(
    needs: ViewNeeds, sampler: SubcaptionSampler, model: torch.nn.Module
) -> tuple[TextCropSampler, MultiCropTransform]:
    """What the loader draws for an objective that declares ``needs``: text crops from ``sampler``'s
    pool (``sampler.k + 1`` texts, its seed) and multi-crop views at ``model``'s input size and
    normalisation."""
    from open_clip.model import get_model_preprocess_cfg

    visual = model.clip.visual
    size, patch = visual.image_size[0], visual.patch_size[0]
    preprocess = get_model_preprocess_cfg(model.clip)
    transform = MultiCropTransform(size, local_crop_size(size, patch), preprocess["mean"], preprocess["std"],
                                   needs.local_crops, needs.crop_scale)
    return TextCropSampler(sampler, num_texts=sampler.num_texts, seed=sampler.seed), transform
