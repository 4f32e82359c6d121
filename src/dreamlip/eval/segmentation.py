"""Zero-shot semantic segmentation from patch-text similarity (no decoder, no training).

For each image:

1. The image is resized (the model's interpolation) so its short side is ``short_side`` (default:
   its own size, raised to the model's input size if smaller), normalised as the model's eval
   transform does, and covered by windows of the model's input size, ``stride`` apart (default
   half a window; the last window is aligned to the border).
2. Each window's projected patch embeddings (``model.encode_image(..., with_patches=True)``, or
   a dense read-out of :mod:`dreamlip.eval.dense` with ``dense=``; several at once share one
   encode) are scored against each class embedding (prompt-ensembled, as zero-shot
   classification) by cosine similarity, upsampled bilinearly to the window, and summed into the
   image; each pixel's scores are divided by the number of windows covering it (averaged
   logits), and the map is upsampled bilinearly to the mask's (the original image's) size;
   ``pamr=True`` then refines it (:mod:`dreamlip.eval.pamr`).
3. Background, when the class list has one (``background``, default the class named
   "background"):
   * ``threshold=None``: background is scored like any class, by its name in the prompts;
   * ``threshold=t``: background gets no prompt; the other classes' scores go through a softmax
     at the model's temperature (``exp(logit_scale)``, at most 100; or ``logit_scale=`` given
     here, e.g. the standard suite's 40) and a pixel whose highest
     foreground probability is below ``t`` becomes background;
   * ``calibrate=SPLIT`` (the task's option) adds a third answer, ``calibrated/`` metrics: the
     same threshold rule, with ``t`` chosen per read-out as the one of 0, 0.02, ..., 1 that gives
     the best mIoU on the first ``calibrate_images`` images of another split of the same data
     (e.g. the training images' masks), never on the evaluated one.
4. The pixel's label is the highest-scoring class.
5. With a background class in the list, the same score maps are also scored the way VOC20 and
   Context59 are (mmseg's ``reduce_zero_label``): background pixels are left out and each other
   pixel takes the highest-scoring object class. These ``objects/`` metrics measure what the
   patches say about the objects, apart from how the background is told from them (step 3),
   which dominates the full protocol when background covers most pixels.

Metrics (percent) over the whole dataset's confusion matrix, pixels at ``ignore_index`` left out:
``mIoU`` (mean over the classes present in the masks or the predictions, as mmseg and torchmetrics'
macro Jaccard index), ``pixel_acc``, ``mAcc`` (mean per-class pixel recall) and ``IoU/<class>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .datasets import EvalDataError, SegmentationSet, Templates, load_image, load_mask, read_segmentation
from .dense import dense_patch_embeddings, parse_readouts, vision_tower
from .encode import EvalContext, EvalLoader, class_embeddings
from .pamr import PAMR_DILATIONS, PAMR_ITERATIONS, pamr
from .seg_datasets import STANDARD, STANDARD_LOGIT_SCALE, BenchmarkSet, load_benchmark_mask, read_benchmark
from .zeroshot import resolve_templates

from dreamlip._compat import ensure_torchvision

__all__ = ["CALIBRATION_THRESHOLDS", "ConfusionMatrix", "SegmentationTask", "Segmenter", "standard_settings"]

# Background thresholds a calibration tries: 0 (background never predicted) to 1 (nearly always).
CALIBRATION_THRESHOLDS = tuple(step / 50 for step in range(51))


class ConfusionMatrix:
    """Pixel counts ``matrix[target, prediction]`` accumulated over a dataset."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, prediction: np.ndarray, target: np.ndarray) -> None:
        prediction, target = np.asarray(prediction), np.asarray(target)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
        valid = target != self.ignore_index
        index = target[valid].astype(np.int64) * self.num_classes + prediction[valid].astype(np.int64)
        self.matrix += np.bincount(index, minlength=self.num_classes**2).reshape(self.matrix.shape)

    def metrics(self, classnames: Sequence[str] | None = None) -> dict[str, float]:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        truth, predicted = m.sum(axis=1), m.sum(axis=0)
        union = truth + predicted - tp
        seen = union > 0  # a class absent from both masks and predictions has no IoU
        iou = np.divide(tp, union, out=np.zeros_like(tp), where=seen)
        recall = np.divide(tp, truth, out=np.zeros_like(tp), where=truth > 0)
        metrics = {
            "mIoU": 100.0 * iou[seen].mean() if seen.any() else 0.0,
            "pixel_acc": 100.0 * tp.sum() / max(m.sum(), 1.0),
            "mAcc": 100.0 * recall[truth > 0].mean() if (truth > 0).any() else 0.0,
        }
        names = classnames or [str(c) for c in range(self.num_classes)]
        metrics.update({f"IoU/{names[c]}": 100.0 * iou[c] for c in np.flatnonzero(seen)})
        return {k: float(v) for k, v in metrics.items()}


def _transforms():
    """torchvision.transforms, imported when first needed (``ensure_torchvision``: a CPU torch)."""
    ensure_torchvision()
    from torchvision import transforms

    return transforms


def _preprocessing(transform: Callable) -> tuple[tuple[int, int], Any, Callable]:
    """Input size, resize interpolation and normalisation of an open_clip-style eval transform."""
    T = _transforms()
    steps = getattr(transform, "transforms", [transform])
    normalize = next((t for t in steps if isinstance(t, T.Normalize)), None)
    crop = next((t for t in steps if isinstance(t, T.CenterCrop)), None)
    resize = next((t for t in steps if isinstance(t, T.Resize)), None)
    size = crop.size if crop is not None else (resize.size if resize is not None else None)
    if normalize is None or size is None:
        raise ValueError(
            "segmentation needs the model's eval transform "
            "(a Compose with Normalize and CenterCrop or Resize)"
        )
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) == 1:
        size = (size[0], size[0])
    interpolation = resize.interpolation if resize is not None else T.InterpolationMode.BICUBIC
    return size, interpolation, normalize


def _starts(length: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - window, 0) + 1, stride))
    if starts[-1] + window < length:  # the last window is aligned to the border
        starts.append(length - window)
    return starts


class Segmenter:
    """Per-image zero-shot label maps; ``segmenter(image)`` -> int64 ``[H, W]`` class indices.

    Built once (class prompts are encoded here), then called on PIL images: the evaluation uses
    it, and it gives label maps for visualisation (put the model in eval mode first).
    ``templates`` default to CLIP's 80 ImageNet ones; the other options are described in the
    module docstring.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Callable,
        transform: Callable,
        classnames: Sequence[str],
        templates: Templates | None = None,
        *,
        background: str | None = "background",
        threshold: float | None = None,
        stride: int | None = None,
        short_side: int | None = None,
        dense: str | Sequence[str] = "raw",
        pamr: bool = False,
        logit_scale: float | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ):
        self.ctx = EvalContext(model, tokenizer, transform, torch.device(device), batch_size, progress=False)
        self.classnames = list(classnames)
        self.readouts = parse_readouts(dense)
        if self.readouts != ["raw"]:
            vision_tower(model)  # fails here, before any image, if the tower cannot do it
        self.pamr = pamr
        self.window, self.interpolation, self.normalize = _preprocessing(transform)
        self.stride = stride or max(1, min(self.window) // 2)
        self.short_side = short_side
        self.threshold = threshold
        self.background_index = self.classnames.index(background) if background in self.classnames else None
        self.scored = list(range(len(self.classnames)))
        # The softmax temperature of a background threshold, given here or calibrated by the task.
        self.scale = (
            float(logit_scale)
            if logit_scale is not None
            else float(model.logit_scale.detach().exp().clamp(max=100))
            if hasattr(model, "logit_scale")
            else None
        )
        if threshold is not None:
            if self.background_index is None:
                raise ValueError(
                    f"a background threshold needs a background class; "
                    f"{background!r} is not in the class list"
                )
            if self.scale is None:
                raise ValueError(
                    "a background threshold needs the model's logit_scale (its softmax temperature)"
                )
            self.scored.remove(self.background_index)
        self.object_rows = [row for row, c in enumerate(self.scored) if c != self.background_index]  # step 5
        names = [self.classnames[c] for c in self.scored]
        weights = class_embeddings(self.ctx, names, resolve_templates(templates, None))
        self.weights = weights.to(self.ctx.device)

    def _working_image(self, image: Image.Image) -> torch.Tensor:
        width, height = image.size
        target = self.short_side or min(width, height)
        target = max(target, *self.window)  # every side must hold at least one window
        scale = target / min(width, height)
        if scale != 1:
            size = [max(self.window[0], round(height * scale)), max(self.window[1], round(width * scale))]
            image = _transforms().functional.resize(image, size, interpolation=self.interpolation, antialias=True)
        return self.normalize(_transforms().functional.to_tensor(image))

    def _patches(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.readouts == ["raw"]:  # any model with DreamLIPModel's interface
            return {"raw": self.ctx.model.encode_image(crops, with_patches=True)[1]}
        return dense_patch_embeddings(self.ctx.model, crops, self.readouts)

    @torch.no_grad()
    def score_maps(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """Per read-out, averaged cosine similarities ``[C', H, W]`` of the scored classes at the
        image's size (on the model's device), PAMR-refined if asked."""
        device = self.ctx.device
        x = self._working_image(image).to(device)
        (wh, ww), (_, h, w) = self.window, x.shape
        boxes = [(top, left) for top in _starts(h, wh, self.stride) for left in _starts(w, ww, self.stride)]
        totals = {r: torch.zeros(len(self.scored), h, w, device=device) for r in self.readouts}
        count = torch.zeros(1, h, w, device=device)
        for start in range(0, len(boxes), self.ctx.batch_size):
            batch = boxes[start : start + self.ctx.batch_size]
            crops = torch.stack([x[:, top : top + wh, left : left + ww] for top, left in batch])
            for readout, patches in self._patches(crops).items():
                n = patches.shape[1]
                gh = round(math.sqrt(n * wh / ww))
                if gh * (n // gh) != n:
                    raise ValueError(f"{n} patch tokens do not form a grid for a {wh}x{ww} window")
                logits = (patches @ self.weights.T).float()  # [B, N, C']
                logits = logits.transpose(1, 2).reshape(len(batch), -1, gh, n // gh)
                logits = F.interpolate(logits, size=(wh, ww), mode="bilinear", align_corners=False)
                for (top, left), window_logits in zip(batch, logits, strict=True):
                    totals[readout][:, top : top + wh, left : left + ww] += window_logits
            for top, left in batch:
                count[:, top : top + wh, left : left + ww] += 1
        maps = {}
        for readout, total in totals.items():
            mean = total / count
            if (h, w) != (image.height, image.width):
                mean = F.interpolate(
                    mean[None], size=(image.height, image.width), mode="bilinear", align_corners=False
                )[0]
            if self.pamr:
                pixels = self.normalize(_transforms().functional.to_tensor(image)).to(device)
                mean = pamr(pixels, mean, PAMR_ITERATIONS, PAMR_DILATIONS)
            maps[readout] = mean
        return maps

    def scores(self, image: Image.Image) -> torch.Tensor:
        """The first read-out's score map (see :meth:`score_maps`)."""
        return self.score_maps(image)[self.readouts[0]]

    def labels(self, scores: torch.Tensor) -> np.ndarray:
        """The int64 ``[H, W]`` label map of a score map (steps 3 and 4)."""
        if self.threshold is not None:
            return self.threshold_labels(scores, self.threshold)
        return torch.tensor(self.scored, device=scores.device)[scores.argmax(0)].cpu().numpy()

    def foreground(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pixel, the highest object-class probability (a softmax over the object classes
        only, at the threshold's temperature) and that class: ``[H, W]`` float and int64."""
        rows = torch.tensor(self.object_rows, device=scores.device)
        confidence, best = (self.scale * scores[rows]).softmax(0).max(0)
        return confidence, torch.tensor(self.scored, device=scores.device)[rows][best]

    def threshold_labels(self, scores: torch.Tensor, threshold: float) -> np.ndarray:
        """The label map with background wherever the foreground probability is below ``threshold``."""
        confidence, labels = self.foreground(scores)
        labels[confidence < threshold] = self.background_index
        return labels.cpu().numpy()

    def object_labels(self, scores: torch.Tensor) -> np.ndarray:
        """The label map over the object classes only (step 5): never the background class."""
        rows = torch.tensor(self.object_rows, device=scores.device)
        classes = torch.tensor(self.scored, device=scores.device)[rows]
        return classes[scores[rows].argmax(0)].cpu().numpy()

    def label_maps(self, image: Image.Image) -> dict[str, np.ndarray]:
        """Per read-out, the int64 ``[H, W]`` label map."""
        return {readout: self.labels(scores) for readout, scores in self.score_maps(image).items()}

    def __call__(self, image: Image.Image) -> np.ndarray:
        return self.labels(self.scores(image))


def standard_settings(preset: str, benchmark: str | None) -> dict[str, Any]:
    """The settings of ``preset`` for ``benchmark``: ``"standard"`` is the training-free
    segmentation suite's (SCLIP's and NACLIP's evaluation configs): CLIP's 80 ImageNet templates,
    the set's short side (336; 448 for COCO-Stuff, 560 for Cityscapes), windows of the model's input
    size at half-window stride (224 and 112 for a 224 model), and for VOC21, Context60 and
    COCO-Object background by probability threshold 0.1 at softmax scale 40."""
    if preset != "standard":
        raise ValueError(f"unknown segmentation preset {preset!r}; expected 'standard'")
    if benchmark not in STANDARD:
        raise ValueError(f"the standard preset needs a benchmark, one of {list(STANDARD)}; got {benchmark!r}")
    settings: dict[str, Any] = {"templates": "imagenet", **STANDARD[benchmark]}
    if "threshold" in settings:
        settings["logit_scale"] = STANDARD_LOGIT_SCALE
    return settings


def _objects_only(mask: np.ndarray, background: int, ignore_index: int) -> np.ndarray:
    """The mask with its background pixels at the ignore index (step 5)."""
    return np.where(mask == background, ignore_index, mask)


def _mask(data: SegmentationSet, index: int) -> np.ndarray:
    path = data.masks[index]
    if isinstance(data, BenchmarkSet):
        return load_benchmark_mask(path, data)
    return load_mask(path, len(data.classnames), data.ignore_index)


class _Pairs(Dataset):
    def __init__(self, data: SegmentationSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray, str]:
        return load_image(self.data.images[index]), _mask(self.data, index), self.data.masks[index]


def _single(batch: list) -> Any:
    return batch[0]


def _checked_pairs(data: SegmentationSet, ctx: EvalContext, desc: str, count: int | None = None):
    """``(image, mask)`` of the first ``count`` (default all) pairs, each mask the size of its image."""
    pairs = _Pairs(data) if count is None else Subset(_Pairs(data), range(count))
    loader = EvalLoader(pairs, batch_size=1, num_workers=ctx.workers, collate_fn=_single)
    for image, mask, mask_path in tqdm(loader, desc=desc, unit="img", disable=not ctx.progress, leave=False):
        if mask.shape != (image.height, image.width):
            raise EvalDataError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                f"its image {image.width}x{image.height}"
            )
        yield image, mask


@dataclass
class SegmentationTask:
    """Zero-shot segmentation over ``data`` (see :func:`read_segmentation` for layouts), or over
    a standard ``benchmark`` root (:mod:`dreamlip.eval.seg_datasets`; ``split`` "test" then means
    the set's validation split). ``preset="standard"`` fills the settings left unset with the
    suite's (:func:`standard_settings`)."""

    data: str | Path
    classes: str | Sequence[str] | None = None
    templates: str | Sequence[str] | None = None
    split: str = "test"
    background: str | None = "background"
    threshold: float | None = None
    stride: int | None = None
    short_side: int | None = None
    dense: str | Sequence[str] = "raw"  # a read-out, "raw,naclip" or a list: see dreamlip.eval.dense
    pamr: bool = False
    logit_scale: float | None = None  # softmax temperature for the threshold (default: the model's)
    calibrate: str | None = None  # a split of the same data whose masks choose a background threshold
    calibrate_images: int = 100  # the first this many images of that split
    benchmark: str | None = None  # voc21, voc20, context60, context59, coco_object, coco_stuff, ade20k, cityscapes
    preset: str | None = None  # "standard"
    name: str = "segmentation"
    _dataset: SegmentationSet | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        parse_readouts(self.dense)  # an unknown read-out fails when the task is built
        if self.calibrate_images < 1:
            raise ValueError(f"calibrate_images must be at least 1; got {self.calibrate_images}")
        if self.preset is not None:
            for key, value in standard_settings(self.preset, self.benchmark).items():
                if getattr(self, key) is None:
                    setattr(self, key, value)

    @property
    def dataset(self) -> SegmentationSet:
        if self._dataset is None:
            self._dataset = self._read(self.split)
        return self._dataset

    def _read(self, split: str) -> SegmentationSet:
        if self.benchmark is not None:
            if self.classes is not None:
                raise EvalDataError(f"benchmark {self.benchmark!r} has its own class list; give no classes")
            return read_benchmark(self.benchmark, self.data, None if split == "test" else split)
        return read_segmentation(self.data, classes=self.classes, split=split)

    def segmenter(self, ctx: EvalContext) -> Segmenter:
        data = self.dataset
        return Segmenter(
            ctx.model, ctx.tokenizer, ctx.transform, data.classnames,
            resolve_templates(self.templates, data.templates),
            background=self.background, threshold=self.threshold, stride=self.stride,
            short_side=self.short_side, dense=self.dense, pamr=self.pamr, logit_scale=self.logit_scale,
            device=ctx.device, batch_size=ctx.batch_size,
        )  # fmt: skip

    def run(self, ctx: EvalContext) -> dict[str, float]:
        """Metrics as the module docstring lists, of the first read-out in ``dense``; each further
        read-out's as ``<read-out>/<metric>`` (so ``dense="raw,naclip"`` keeps today's keys).
        With ``calibrate``, also ``calibrated/<metric>`` and ``calibrated/threshold``: background
        below the threshold :meth:`calibrated_thresholds` picks for that read-out."""
        data = self.dataset
        segmenter = self.segmenter(ctx)
        thresholds = self.calibrated_thresholds(segmenter, ctx) if self.calibrate is not None else {}
        background = segmenter.background_index
        protocols = {"": segmenter.labels} | ({"objects/": segmenter.object_labels} if background is not None else {})
        confusions = {
            (r, p): ConfusionMatrix(len(data.classnames), data.ignore_index)
            for r in segmenter.readouts
            for p in [*protocols, *(["calibrated/"] if thresholds else [])]
        }
        for image, mask in _checked_pairs(data, ctx, self.name):
            targets = {"": mask}
            if background is not None:
                targets["objects/"] = _objects_only(mask, background, data.ignore_index)
            for readout, scores in segmenter.score_maps(image).items():
                for protocol, labels in protocols.items():
                    confusions[readout, protocol].update(labels(scores), targets[protocol])
                if thresholds:
                    confusions[readout, "calibrated/"].update(segmenter.threshold_labels(scores, thresholds[readout]), mask)
        first = segmenter.readouts[0]
        metrics = {}
        for (readout, protocol), confusion in confusions.items():
            prefix = ("" if readout == first else f"{readout}/") + protocol
            metrics |= {f"{prefix}{k}": v for k, v in confusion.metrics(data.classnames).items()}
            if protocol == "calibrated/":
                metrics[f"{prefix}threshold"] = thresholds[readout]
        return {**metrics, "n_images": float(len(data.images))}

    def calibrated_thresholds(self, segmenter: Segmenter, ctx: EvalContext) -> dict[str, float]:
        """Per read-out, the background threshold (of :data:`CALIBRATION_THRESHOLDS`) with the
        highest mIoU over the first ``calibrate_images`` images of the ``calibrate`` split; ties
        go to the lowest. The evaluated split's masks never choose it."""
        if self.calibrate == self.split:
            raise ValueError(f"calibrate={self.calibrate!r} is the evaluated split: its masks would choose the threshold")
        if segmenter.background_index is None:
            raise EvalDataError(f"calibrating a background threshold needs a background class; {self.background!r} is not in the class list")
        if segmenter.threshold is not None:
            raise ValueError("give a background threshold or calibrate one, not both")
        if segmenter.scale is None:
            raise ValueError("calibrating a background threshold needs the model's logit_scale (its softmax temperature)")
        data = self._read(self.calibrate)
        count = min(self.calibrate_images, len(data.images))
        if count < 1:
            raise EvalDataError(f"calibrate split {self.calibrate!r} has no images to calibrate on")
        confusions = {
            (r, t): ConfusionMatrix(len(data.classnames), data.ignore_index)
            for r in segmenter.readouts
            for t in CALIBRATION_THRESHOLDS
        }
        for image, mask in _checked_pairs(data, ctx, f"{self.name} calibration", count):
            for readout, scores in segmenter.score_maps(image).items():
                confidence, labels = (x.cpu().numpy() for x in segmenter.foreground(scores))
                for threshold in CALIBRATION_THRESHOLDS:
                    prediction = np.where(confidence < threshold, segmenter.background_index, labels)
                    confusions[readout, threshold].update(prediction, mask)
        return {
            readout: max(CALIBRATION_THRESHOLDS, key=lambda t: (confusions[readout, t].metrics()["mIoU"], -t))
            for readout in segmenter.readouts
        }

    def constant_baselines(self) -> dict[str, dict[str, Any]]:
        """What constant predictions score with this task's metric code: background everywhere
        (``background_everywhere``) and, for the objects-only metrics, the commonest object class
        of these masks everywhere (``commonest_shape_everywhere``, a best case for a constant:
        it is picked on the masks themselves). Empty without a background class."""
        data = self.dataset
        classes, ignore = len(data.classnames), data.ignore_index
        if self.background not in data.classnames:
            return {}
        background = data.classnames.index(self.background)
        masks = [_mask(data, i) for i in range(len(data.images))]
        pixels = sum(np.bincount(mask[mask != ignore].ravel(), minlength=classes) for mask in masks)
        commonest = max((c for c in range(classes) if c != background), key=lambda c: pixels[c])
        everywhere, objects = ConfusionMatrix(classes, ignore), ConfusionMatrix(classes, ignore)
        for mask in masks:
            everywhere.update(np.full_like(mask, background), mask)
            objects.update(np.full_like(mask, commonest), _objects_only(mask, background, ignore))
        everywhere, objects = everywhere.metrics(data.classnames), objects.metrics(data.classnames)
        # background everywhere is also a calibrated answer (threshold 1), so it bounds that protocol too
        protocols = ["", *(["calibrated/"] if self.calibrate is not None else [])]
        return {
            "background_everywhere": {f"{self.name}/{p}{k}": everywhere[k] for p in protocols for k in ("mIoU", "pixel_acc", "mAcc")},
            "commonest_shape_everywhere": {f"{self.name}/objects/{k}": objects[k] for k in ("mIoU", "pixel_acc", "mAcc")}
            | {"shape": data.classnames[commonest]},
        }

    def describe(self) -> dict[str, Any]:
        data = self.dataset
        templates = resolve_templates(self.templates, data.templates)
        readouts = parse_readouts(self.dense)
        return {
            "task": "segmentation",
            "name": self.name,
            "data": data.source,
            "classes": data.classnames,
            "ignore_index": data.ignore_index,
            "templates": templates if isinstance(templates, list) else "class-specific",
            "background": "threshold" if self.threshold is not None else "prompt",
            "background_class": self.background if self.background in data.classnames else None,
            "threshold": self.threshold,
            "calibrate": {"split": self.calibrate, "images": self.calibrate_images} if self.calibrate is not None else None,
            "stride": self.stride,
            "short_side": self.short_side,
            "dense": readouts[0] if len(readouts) == 1 else readouts,
            "pamr": {"iterations": PAMR_ITERATIONS, "dilations": list(PAMR_DILATIONS)} if self.pamr else None,
            "logit_scale": self.logit_scale,
            "benchmark": self.benchmark,
            "preset": self.preset,
        }
