"""The tasks end to end: an oracle model scores 100, a shuffled one 0; the long-text policy; the
Python API during training; the ``dreamlip eval`` command and its errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import NANO, run_cli
from dreamlip._compat import ensure_torchvision
from dreamlip.captions import split_sentences
from dreamlip.checkpoint import save_checkpoint
from dreamlip.synthetic import generate
from dreamlip.eval import RetrievalTask, SegmentationTask, Segmenter, ZeroShotTask, build_tasks, evaluate
from dreamlip.eval.encode import EvalContext, encode_texts
from dreamlip.model import create_model

ensure_torchvision()
from torchvision import transforms as T  # noqa: E402  isort: skip  (after the CPU-torch shim)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
GREY = (128, 128, 128)
WINDOW = 16


class ColourModel(torch.nn.Module):
    """An oracle: each pixel is a patch embedded as its colour; a text embeds as the colours it names."""

    def __init__(self, tokenizer):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))
        self.word_ids = [tokenizer.encode(name)[0] for name in COLOURS]
        self.modes_seen = []

    def encode_image(self, images, with_patches=False):
        self.modes_seen.append(self.training)
        centred = images * 0.25  # undo Normalize(0.5, 0.25), then centre on grey: grey embeds as 0
        pixels = centred.flatten(2).transpose(1, 2)
        return F.normalize(centred.mean((2, 3)), dim=-1), F.normalize(
            pixels, dim=-1
        ) if with_patches else None

    def encode_text(self, tokens):
        named = torch.stack([(tokens == i).any(-1) for i in self.word_ids], -1).float()
        return F.normalize(named, dim=-1)


TRANSFORM = T.Compose(
    [
        T.Resize(WINDOW, interpolation=T.InterpolationMode.NEAREST),
        T.CenterCrop(WINDOW),
        T.ToTensor(),
        T.Normalize([0.5] * 3, [0.25] * 3),
    ]
)


def _solid(path, colour, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


# --- an oracle scores 100, a shuffled class list 0 ---------------------------------------------


def test_zeroshot_oracle_scores_100_and_shuffled_names_0(tmp_path, tokenizer):
    for name, colour in COLOURS.items():
        for i in range(2):
            _solid(tmp_path / name / f"{i}.png", colour)
    templates = ["a photo of {}.", "{c} art"]
    model = ColourModel(tokenizer)
    right = ZeroShotTask(tmp_path, templates=templates)
    # folders sort as blue, green, red: every folder gets another colour's name
    shuffled = ZeroShotTask(tmp_path, classes=["green", "red", "blue"], templates=templates, name="shuffled")
    metrics = evaluate(model, tokenizer, TRANSFORM, [right, shuffled], progress=False)
    assert metrics["zeroshot/top1"] == 100.0 and metrics["zeroshot/mean_per_class"] == 100.0
    assert metrics["shuffled/top1"] == 0.0
    assert metrics["zeroshot/n_images"] == 6.0


def test_retrieval_oracle_scores_100(tmp_path, tokenizer):
    items = []
    for name, colour in COLOURS.items():
        _solid(tmp_path / f"{name}.png", colour)
        items.append({"image": f"{name}.png", "texts": [f"a {name} square", f"something {name}"]})
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(x) for x in items))
    metrics = evaluate(
        ColourModel(tokenizer),
        tokenizer,
        TRANSFORM,
        RetrievalTask(tmp_path / "set.jsonl", ks=(1,)),
        progress=False,
    )
    assert metrics == {
        "retrieval/image_to_text_R@1": 100.0,
        "retrieval/text_to_image_R@1": 100.0,
        "retrieval/n_images": 3.0,
        "retrieval/n_texts": 6.0,
        "retrieval/n_long_texts": 0.0,
    }


def _scene(width, height, boxes):
    """A grey image and its mask with coloured boxes (x0, y0, x1, y1, class index 1..3)."""
    pixels = np.full((height, width, 3), GREY, np.uint8)
    mask = np.zeros((height, width), np.uint8)
    for x0, y0, x1, y1, label in boxes:
        pixels[y0:y1, x0:x1] = list(COLOURS.values())[label - 1]
        mask[y0:y1, x0:x1] = label
    return Image.fromarray(pixels), mask


@pytest.fixture
def voc(tmp_path):
    """Two images: one larger than the window (slid over), one smaller (upscaled 2x)."""
    scenes = {
        "large": _scene(40, 24, [(3, 2, 15, 11, 1), (20, 10, 37, 22, 3), (30, 0, 40, 4, 2)]),
        "small": _scene(12, 8, [(0, 0, 5, 3, 2), (7, 4, 12, 8, 1)]),
    }
    for name, (image, mask) in scenes.items():
        (tmp_path / "JPEGImages").mkdir(exist_ok=True)
        (tmp_path / "SegmentationClass").mkdir(exist_ok=True)
        image.save(tmp_path / "JPEGImages" / f"{name}.png")  # PNG: JPEG noise would colour the grey
        mask[0, 0] = 255 if name == "large" else mask[0, 0]  # an ignored pixel
        Image.fromarray(mask, "L").save(tmp_path / "SegmentationClass" / f"{name}.png")
    (tmp_path / "classes.txt").write_text("background\n" + "\n".join(COLOURS) + "\n")
    return tmp_path


def test_segmentation_oracle_scores_100_with_sliding_windows_and_threshold(voc, tokenizer):
    task = SegmentationTask(voc, templates=["a {} region"], threshold=0.5, stride=5)
    metrics = evaluate(ColourModel(tokenizer), tokenizer, TRANSFORM, task, progress=False)
    assert metrics["segmentation/mIoU"] == 100.0 and metrics["segmentation/pixel_acc"] == 100.0
    assert set(metrics) >= {f"segmentation/IoU/{name}" for name in ("background", *COLOURS)}


def test_segmentation_with_a_shuffled_class_list_scores_0_on_objects(voc, tokenizer):
    (voc / "classes.txt").write_text("background\ngreen\nblue\nred\n")
    metrics = evaluate(
        ColourModel(tokenizer), tokenizer, TRANSFORM, SegmentationTask(voc, threshold=0.5), progress=False
    )
    assert metrics["segmentation/IoU/background"] == 100.0
    assert all(metrics[f"segmentation/IoU/{name}"] == 0.0 for name in COLOURS)


def test_objects_only_metrics_equal_a_per_pixel_reference_without_background(voc, tokenizer):
    """The VOC20-style ``objects/`` metrics: background pixels left out, the background class never
    predicted; checked pixel by pixel on a random model's own score maps."""
    torch.manual_seed(0)
    model, _, transform = create_model(NANO)
    model.eval()
    task = SegmentationTask(voc, templates=["a {}."])
    metrics = evaluate(model, tokenizer, transform, task, progress=False)
    segmenter = task.segmenter(EvalContext(model, tokenizer, transform, torch.device("cpu"), progress=False))
    counts = {c: [0, 0, 0] for c in range(1, 4)}  # per object class: true positives, false positives, false negatives
    for image_path, mask_path in zip(task.dataset.images, task.dataset.masks, strict=True):
        scores = segmenter.scores(Image.open(image_path).convert("RGB")).numpy()
        mask = np.asarray(Image.open(mask_path))
        for y in range(mask.shape[0]):
            for x in range(mask.shape[1]):
                truth = int(mask[y, x])
                if truth in (0, 255):
                    continue
                predicted = 1 + int(np.argmax(scores[1:, y, x]))  # row c is class c; row 0 the background
                counts[truth][0 if predicted == truth else 2] += 1
                if predicted != truth:
                    counts[predicted][1] += 1
    ious = [tp / (tp + fp + fn) for tp, fp, fn in counts.values() if tp + fp + fn]
    assert metrics["segmentation/objects/mIoU"] == pytest.approx(100 * sum(ious) / len(ious))
    assert "segmentation/objects/IoU/background" not in metrics
    assert metrics["segmentation/objects/mIoU"] != pytest.approx(metrics["segmentation/mIoU"])


def test_objects_only_metrics_with_a_background_threshold(voc, tokenizer):
    metrics = evaluate(
        ColourModel(tokenizer), tokenizer, TRANSFORM, SegmentationTask(voc, threshold=0.5), progress=False
    )
    assert metrics["segmentation/objects/mIoU"] == 100.0
    assert set(k for k in metrics if k.startswith("segmentation/objects/IoU/")) == {
        f"segmentation/objects/IoU/{name}" for name in COLOURS
    }


def _split(voc, **splits):
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def test_calibrated_threshold_is_the_lowest_best_on_the_other_split(voc, tokenizer):
    """The oracle's grey pixels have foreground probability 1/3 and its coloured ones about 1, so
    on the training image every threshold above 1/3 is perfect: the lowest, 0.34, is chosen."""
    _split(voc, train=["small"], test=["large"])
    task = SegmentationTask(voc, templates=["a {} region"], calibrate="train", stride=5)
    metrics = evaluate(ColourModel(tokenizer), tokenizer, TRANSFORM, task, progress=False)
    assert metrics["segmentation/calibrated/threshold"] == pytest.approx(0.34)
    assert metrics["segmentation/calibrated/mIoU"] == 100.0
    assert metrics["segmentation/n_images"] == 1.0  # the test split only
    baselines = task.constant_baselines()["background_everywhere"]
    assert baselines["segmentation/calibrated/mIoU"] == baselines["segmentation/mIoU"]


def _reference_miou(predicted: dict, masks: dict, classes: int) -> float:
    """mIoU with explicit loops over pixels: per class, true positives over the union."""
    tp, fp, fn = [0] * classes, [0] * classes, [0] * classes
    for name, mask in masks.items():
        for y in range(mask.shape[0]):
            for x in range(mask.shape[1]):
                truth, guess = int(mask[y, x]), int(predicted[name][y][x])
                if truth == 255:
                    continue
                if truth == guess:
                    tp[truth] += 1
                else:
                    fn[truth] += 1
                    fp[guess] += 1
    ious = [tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(classes) if tp[c] + fp[c] + fn[c]]
    return 100 * sum(ious) / len(ious)


def test_calibrated_metrics_equal_a_per_pixel_reference(voc, tokenizer):
    """On a random model: the threshold is the grid's best on the training masks and the test
    metrics use it, each recomputed here pixel by pixel from the model's score maps."""
    _split(voc, train=["small"], test=["large"])
    torch.manual_seed(0)
    model, _, transform = create_model(NANO)
    model.eval()
    task = SegmentationTask(voc, templates=["a {}."], calibrate="train", calibrate_images=1)
    metrics = evaluate(model, tokenizer, transform, task, progress=False)
    segmenter = task.segmenter(EvalContext(model, tokenizer, transform, torch.device("cpu"), progress=False))
    scale = float(model.logit_scale.detach().exp())
    score_maps = {
        name: segmenter.scores(Image.open(voc / "JPEGImages" / f"{name}.png").convert("RGB")).numpy()
        for name in ("small", "large")
    }

    def labels(name, threshold):
        scores = score_maps[name]
        out = []
        for y in range(scores.shape[1]):
            row = []
            for x in range(scores.shape[2]):
                objects = [scale * scores[c, y, x] for c in (1, 2, 3)]  # row c is class c; row 0 the background
                top = max(objects)
                probability = 1 / sum(math.exp(v - top) for v in objects)
                row.append(0 if probability < threshold else 1 + objects.index(top))
            out.append(row)
        return out

    masks = {name: np.asarray(Image.open(voc / "SegmentationClass" / f"{name}.png")) for name in ("small", "large")}
    grid = [step / 50 for step in range(51)]
    on_train = [_reference_miou({"small": labels("small", t)}, {"small": masks["small"]}, 4) for t in grid]
    chosen = grid[on_train.index(max(on_train))]  # the first best: the lowest
    assert metrics["segmentation/calibrated/threshold"] == pytest.approx(chosen)
    expected = _reference_miou({"large": labels("large", chosen)}, {"large": masks["large"]}, 4)
    assert metrics["segmentation/calibrated/mIoU"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"calibrate": "test"}, "is the evaluated split"),
        ({"calibrate": "train", "threshold": 0.5}, "not both"),
        ({"calibrate": "train", "background": "void"}, "needs a background class"),
    ],
)
def test_calibration_refuses_what_would_be_wrong(voc, tokenizer, options, message):
    _split(voc, train=["small"], test=["large"])
    with pytest.raises(ValueError, match=message):
        evaluate(ColourModel(tokenizer), tokenizer, TRANSFORM, SegmentationTask(voc, **options), progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        SegmentationTask(voc, calibrate="train", calibrate_images=0)


def test_constant_baselines_count_mask_pixels(voc):
    masks = [np.asarray(Image.open(p)) for p in sorted((voc / "SegmentationClass").glob("*.png"))]
    counts = np.bincount(np.concatenate([m[m != 255] for m in masks]), minlength=4)
    commonest = 1 + int(np.argmax(counts[1:]))
    baselines = SegmentationTask(voc).constant_baselines()
    # background everywhere: background's IoU is its pixel share, the other classes present score 0
    assert baselines["background_everywhere"]["segmentation/mIoU"] == pytest.approx(100 * counts[0] / counts.sum() / 4)
    objects = baselines["commonest_shape_everywhere"]
    assert objects["shape"] == list(COLOURS)[commonest - 1]
    assert objects["segmentation/objects/mIoU"] == pytest.approx(100 * counts[commonest] / counts[1:].sum() / 3)
    assert objects["segmentation/objects/pixel_acc"] == pytest.approx(100 * counts[commonest] / counts[1:].sum())


def test_sliding_window_scores_are_averaged_not_summed(voc, tokenizer):
    """Windows overlap 1 to 6 times here; each pixel must keep the score one window gives it."""
    segmenter = Segmenter(
        ColourModel(tokenizer), tokenizer, TRANSFORM, list(COLOURS), ["{}"], background=None, stride=3
    )
    image = Image.open(voc / "JPEGImages" / "large.png").convert("RGB")
    # The oracle's pixel embedding, normalise(rgb - grey), scored against one-hot class embeddings.
    direct = F.normalize(T.ToTensor()(image) - 0.5, dim=0)
    torch.testing.assert_close(segmenter.scores(image), direct, atol=1e-5, rtol=1e-5)


def test_segmenter_on_a_real_model_gives_a_label_map_of_the_image_size(tokenizer):
    torch.manual_seed(0)
    model, _, transform = create_model(NANO)
    names = ["background", "circle", "square"]
    for threshold in (None, 1.01):
        segmenter = Segmenter(model.eval(), tokenizer, transform, names, ["a {}."], threshold=threshold)
        labels = segmenter(Image.new("RGB", (50, 37), (10, 200, 30)))
        assert labels.shape == (37, 50) and labels.dtype == np.int64
        assert set(np.unique(labels)) <= {0, 1, 2}
    assert (labels == 0).all()  # no probability reaches 1.01: everything is background


# --- long texts ------------------------------------------------------------------------------


def test_long_text_policies(tokenizer):
    torch.manual_seed(0)
    model = create_model(NANO)[0].eval()
    ctx = EvalContext(model, tokenizer, None, torch.device("cpu"), batch_size=4, progress=False)
    long = " ".join(
        f"The {i}th object is a small striped red star near the top left corner." for i in range(8)
    )
    sentences = split_sentences(long)
    assert len(tokenizer.encode(long)) > 77 and len(sentences) == 8
    texts = ["a short caption", long]
    with torch.no_grad():
        truncated, n_long = encode_texts(ctx, texts, "truncate")
        split, n_long_split = encode_texts(ctx, texts, "sentences")
        whole = model.encode_text(tokenizer(texts))
        per_sentence = model.encode_text(tokenizer(sentences))
    assert n_long == n_long_split == 1
    torch.testing.assert_close(truncated, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(split[0], whole[0], atol=1e-6, rtol=1e-5)  # fits: encoded whole
    torch.testing.assert_close(split[1], F.normalize(per_sentence.mean(0), dim=0), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(split[1], truncated[1], atol=1e-3)


# --- the Python API during training ----------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate(root, n_train=24, n_test=8, image_size=32, seed=0)
    return root


def test_evaluate_runs_in_eval_mode_and_restores_training_mode(tmp_path, tokenizer):
    for name, colour in COLOURS.items():
        _solid(tmp_path / name / "0.png", colour)
    model = ColourModel(tokenizer).train()
    evaluate(
        model,
        tokenizer,
        TRANSFORM,
        {"task": "zeroshot", "data": str(tmp_path), "templates": ["{}"]},
        progress=False,
    )
    assert model.modes_seen == [False] and model.training


def test_build_tasks_on_the_demo_dir_evaluates_everything(demo, tokenizer):
    torch.manual_seed(0)
    model, _, transform = create_model(NANO)
    tasks = build_tasks(
        demo,
        [*("zeroshot", "retrieval", "segmentation", "linear_probe"), "long_retrieval"],
        long_text="sentences",
        C=1.0,
    )
    metrics = evaluate(model, tokenizer, transform, tasks, progress=False)
    # Each score counts hits over its own set (8 test images, their texts): a percentage of that size.
    for key, count in (
        ("zeroshot/top1", 8),
        ("zeroshot/top5", 8),
        ("linear_probe/top1", 8),
        ("retrieval/image_to_text_R@10", metrics["retrieval/n_images"]),
        ("retrieval/text_to_image_R@1", metrics["retrieval/n_texts"]),
        ("long_retrieval/text_to_image_R@5", metrics["long_retrieval/n_texts"]),
    ):
        hits = metrics[key] * count / 100
        assert hits == pytest.approx(round(hits)) and 0 <= round(hits) <= count, (key, metrics[key])
    assert metrics["zeroshot/top1"] <= metrics["zeroshot/top5"]
    for direction in ("image_to_text", "text_to_image"):
        recalls = [metrics[f"retrieval/{direction}_R@{k}"] for k in (1, 5, 10)]
        assert recalls == sorted(recalls), (direction, recalls)
    assert {"segmentation/mIoU", "segmentation/pixel_acc"} <= metrics.keys()  # values: test_eval_metrics
    assert metrics["long_retrieval/n_texts"] == 24.0 and metrics["long_retrieval/n_long_texts"] > 0
    assert metrics["linear_probe/n_train"] == 24.0 and metrics["linear_probe/C"] == 1.0
    assert all(isinstance(v, float) for v in metrics.values())
    with pytest.raises(ValueError, match="no task among .* takes option"):
        build_tasks(demo, ["retrieval"], threshold=0.5)


# --- dreamlip eval ---------------------------------------------------------------------------


def _cli(*argv):
    return run_cli("eval", *argv)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, _, _ = create_model(NANO)
    path = tmp_path_factory.mktemp("ckpt") / "nano.pt"
    save_checkpoint(path, {"model_name": NANO, "model": model.state_dict(), "config": {}})
    return path


def test_cli_writes_results_json(demo, checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = _cli(
        "--checkpoint",
        checkpoint,
        "--data",
        demo,
        "--tasks",
        "zeroshot,retrieval,segmentation",
        "--long-text",
        "sentences",
        "--seg-threshold",
        "0.3",
        "--workers",
        "0",
        "--quiet",
        "--out",
        out,
    )
    assert rc == 0
    results = json.loads(out.read_text())
    assert results["model"]["model_name"] == NANO
    assert {t["name"]: t for t in results["tasks"]}["retrieval"]["long_text"] == "sentences"
    assert {t["name"]: t for t in results["tasks"]}["segmentation"]["background"] == "threshold"
    assert set(results["metrics"]) >= {"zeroshot/top1", "retrieval/image_to_text_R@1", "segmentation/mIoU"}
    assert "zeroshot/top1" in capsys.readouterr().out


def test_cli_calibrates_the_background_threshold_on_the_training_masks(demo, checkpoint, tmp_path):
    out = tmp_path / "results.json"
    argv = ["--checkpoint", checkpoint, "--data", demo, "--tasks", "segmentation", "--workers", "0", "--quiet"]
    assert _cli(*argv, "--seg-calibrate", "train", "--seg-calibrate-images", "2", "--out", out) == 0
    results = json.loads(out.read_text())
    assert results["tasks"][0]["calibrate"] == {"split": "train", "images": 2}
    assert results["metrics"]["segmentation/calibrated/threshold"] in [step / 50 for step in range(51)]
    assert "segmentation/calibrated/mIoU" in results["metrics"]


def test_cli_refuses_a_checkpoint_that_is_not_ours(demo, tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    assert _cli("--checkpoint", foreign, "--data", demo, "--tasks", "zeroshot", "--workers", "0") == 2
    assert "not a dreamlip checkpoint" in capsys.readouterr().err


def test_cli_reports_a_class_list_that_does_not_match_the_masks(demo, checkpoint, tmp_path, capsys):
    (tmp_path / "classes.txt").write_text("background\ncircle\n")
    rc = _cli(
        "--checkpoint",
        checkpoint,
        "--data",
        demo,
        "--tasks",
        "segmentation",
        "--classes",
        tmp_path / "classes.txt",
        "--workers",
        "0",
        "--quiet",
    )
    assert rc == 2
    assert "outside the class list (2 classes" in capsys.readouterr().err


def test_cli_reports_a_dataset_folder_with_no_images(checkpoint, tmp_path, capsys):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    rc = _cli(
        "--checkpoint", checkpoint, "--data", tmp_path / "data", "--tasks", "zeroshot", "--workers", "0"
    )
    assert rc == 2 and "no images" in capsys.readouterr().err
