"""Each evaluation metric against cases whose answer is known by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreamlip.eval import (
    ConfusionMatrix,
    classification_metrics,
    linear_probe,
    retrieval_metrics,
)

# --- zero-shot classification ----------------------------------------------------------------


def test_classification_hand_case():
    # 4 images, 6 classes. Image 0 right at rank 1; 1 right at rank 2; 2 right at rank 6; 3 right.
    logits = torch.tensor(
        [
            [9.0, 1, 2, 3, 4, 5],
            [9.0, 8, 1, 2, 3, 4],
            [9.0, 8, 7, 6, 5, 1],
            [1.0, 2, 3, 4, 5, 9],
        ]
    )
    labels = torch.tensor([0, 1, 5, 5])
    metrics = classification_metrics(logits, labels)
    assert metrics["top1"] == pytest.approx(50.0)
    assert metrics["top5"] == pytest.approx(75.0)
    # class 0: 1/1, class 1: 0/1, class 5: 1/2 -> mean over present classes = (1 + 0 + 0.5) / 3
    assert metrics["mean_per_class"] == pytest.approx(100 * 1.5 / 3)


def test_classification_top5_only_with_more_than_five_classes():
    metrics = classification_metrics(torch.eye(5), torch.arange(5))
    assert metrics == {"top1": 100.0, "mean_per_class": 100.0}


# --- retrieval -------------------------------------------------------------------------------


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_retrieval_perfect_model_scores_100():
    images = _unit(20, 32, 0)
    # three captions per image, each a small perturbation of its image
    texts = F.normalize(images.repeat_interleave(3, 0) + 0.01 * _unit(60, 32, 1), dim=-1)
    owner = torch.arange(20).repeat_interleave(3)
    metrics = retrieval_metrics(images, texts, owner)
    assert all(v == pytest.approx(100.0) for v in metrics.values()), metrics


def test_retrieval_random_embeddings_score_near_chance():
    n = 400
    metrics = retrieval_metrics(_unit(n, 64, 2), _unit(n, 64, 3), torch.arange(n), ks=(1, 10))
    # chance is k/n: 0.25 % at R@1, 2.5 % at R@10
    assert metrics["text_to_image_R@1"] < 2.0 and metrics["image_to_text_R@1"] < 2.0
    assert 0.5 < metrics["text_to_image_R@10"] < 6.0 and 0.5 < metrics["image_to_text_R@10"] < 6.0


def test_retrieval_hand_case_counts_an_image_found_if_any_caption_is():
    # 3 images on the axes; texts 0,1 belong to image 0, text 2 to image 1, text 3 to image 2.
    images = torch.eye(3)
    texts = torch.tensor(
        [
            [0.0, 1.0, 0.0],  # image 0's caption, closest to image 1 -> image rank 1 (0-based)
            [1.0, 0.0, 0.0],  # image 0's caption, exact -> rank 0
            [0.0, 0.0, 1.0],  # image 1's caption, closest to image 2 -> ranks image 1 at 1 or 2
            [0.0, 0.0, 1.0],  # image 2's caption, exact
        ]
    )
    texts[2] = F.normalize(torch.tensor([0.0, 0.5, 1.0]), dim=0)  # image 2 first, image 1 second
    owner = torch.tensor([0, 0, 1, 2])
    metrics = retrieval_metrics(images, texts, owner, ks=(1, 2))
    # text->image: texts 1 and 3 at rank 0; texts 0 and 2 at rank 1
    assert metrics["text_to_image_R@1"] == pytest.approx(50.0)
    assert metrics["text_to_image_R@2"] == pytest.approx(100.0)
    # image->text: image 0's best text (1) is its top; image 1's only text (2) scores 0.447 with
    # it, behind text 0 (1.0); image 2's texts 3 (1.0) and 2 (0.894) lead. So R@1 = 2/3.
    assert metrics["image_to_text_R@1"] == pytest.approx(100 * 2 / 3)
    assert metrics["image_to_text_R@2"] == pytest.approx(100.0)


def test_retrieval_chunking_does_not_change_the_result():
    images, texts = _unit(50, 16, 4), _unit(150, 16, 5)
    owner = torch.arange(50).repeat_interleave(3)
    assert retrieval_metrics(images, texts, owner, chunk=7) == retrieval_metrics(images, texts, owner)


# --- segmentation ----------------------------------------------------------------------------


def test_confusion_matrix_hand_case():
    ignore = 255
    target = np.array([[0, 0, 1, 1], [0, 2, 2, ignore]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])
    confusion = ConfusionMatrix(4, ignore)
    confusion.update(pred, target)
    metrics = confusion.metrics(["bg", "a", "b", "never"])
    # class 0: tp 2 (0,0),(1,0); fp 1 (1,2); fn 1 (0,1) -> 2/4
    # class 1: tp 2; fp 1 (0,1); fn 0 -> 2/3.  class 2: tp 1; fn 1 -> 1/2.  class 3 absent: no IoU
    assert metrics["IoU/bg"] == pytest.approx(50.0)
    assert metrics["IoU/a"] == pytest.approx(200 / 3)
    assert metrics["IoU/b"] == pytest.approx(50.0)
    assert "IoU/never" not in metrics
    assert metrics["mIoU"] == pytest.approx(100 * (0.5 + 2 / 3 + 0.5) / 3)
    assert metrics["pixel_acc"] == pytest.approx(100 * 5 / 7)  # the ignored pixel is not counted
    assert metrics["mAcc"] == pytest.approx(100 * (2 / 3 + 1 + 0.5) / 3)


def test_confusion_matrix_accumulates_like_torchmetrics():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    rng = np.random.default_rng(0)
    confusion = ConfusionMatrix(5, 255)
    jaccard = MulticlassJaccardIndex(num_classes=5, ignore_index=255, average="macro")
    accuracy = MulticlassAccuracy(num_classes=5, ignore_index=255, average="micro")
    for _ in range(3):
        target = rng.integers(0, 4, size=(6, 7))  # class 4 never occurs in the targets
        target[rng.random(target.shape) < 0.1] = 255
        pred = np.where(rng.random(target.shape) < 0.6, target % 255, rng.integers(0, 5, target.shape))
        confusion.update(pred, target)
        jaccard.update(torch.from_numpy(pred), torch.from_numpy(target))
        accuracy.update(torch.from_numpy(pred), torch.from_numpy(target))
    metrics = confusion.metrics()
    assert metrics["mIoU"] == pytest.approx(100 * jaccard.compute().item(), abs=1e-4)
    assert metrics["pixel_acc"] == pytest.approx(100 * accuracy.compute().item(), abs=1e-4)


def test_confusion_matrix_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        ConfusionMatrix(2).update(np.zeros((2, 2), int), np.zeros((2, 3), int))


# --- linear probe ----------------------------------------------------------------------------


def _blobs(n, seed, shuffle_labels=False):
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 16) * 10  # far apart against unit noise: separable
    y = rng.integers(0, 4, n)
    x = centres[y] + rng.normal(size=(n, 16))
    if shuffle_labels:
        y = rng.permutation(y)
    return x, y


def test_linear_probe_separable_classes_score_100():
    train_x, train_y = _blobs(200, 0)
    test_x, test_y = _blobs(100, 1)
    metrics = linear_probe(train_x, train_y, test_x, test_y)
    assert metrics["top1"] == pytest.approx(100.0)
    assert metrics["C"] in (0.01, 0.1, 1.0, 10.0, 100.0)


def test_linear_probe_shuffled_labels_score_near_chance():
    train_x, train_y = _blobs(400, 2, shuffle_labels=True)
    test_x, test_y = _blobs(400, 3, shuffle_labels=True)
    assert 10.0 < linear_probe(train_x, train_y, test_x, test_y, C=1.0)["top1"] < 40.0  # chance 25 %


def test_linear_probe_binary_and_classes_missing_from_train():
    train_x, train_y = _blobs(200, 4)
    keep = train_y < 2  # train on classes 0 and 1 only
    test_x, test_y = _blobs(100, 5)
    metrics = linear_probe(train_x[keep], train_y[keep], test_x, test_y, C=1.0)
    # classes 2 and 3 can never be predicted, 0 and 1 always are: top-1 is their share of the test set
    assert metrics["top1"] == pytest.approx(100 * np.mean(test_y < 2))
