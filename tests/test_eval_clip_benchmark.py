"""``dreamlip eval`` on a checkpoint agrees with clip_benchmark's own functions on its export."""

import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from conftest import NANO, run_cli
from dreamlip.checkpoint import save_checkpoint
from dreamlip.synthetic import generate
from dreamlip.model import create_model, load_open_clip

open_clip = load_open_clip()

cb_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
cb_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

class _Records(Dataset):
    """test.jsonl read directly (not with dreamlip's readers), as clip_benchmark's loaders give it."""

    def __init__(self, root, transform, target):
        self.root, self.transform, self.target = root, transform, target
        self.records = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
        self.classes = json.loads((root / "classes.json").read_text())["classification"]["names"]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        record = self.records[i]
        image = self.transform(Image.open(self.root / record["image"]).convert("RGB"))
        return image, record[self.target]


def _with_text_lists(batch):
    return torch.stack([image for image, _ in batch]), [texts for _, texts in batch]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    generate(root / "demo", n_train=0, n_test=40, image_size=32, seed=1)
    torch.manual_seed(1)
    model, _, _ = create_model(NANO)
    save_checkpoint(root / "nano.pt", {"model_name": NANO, "model": model.state_dict(), "config": {}})
    assert run_cli("export", "--checkpoint", root / "nano.pt", "--out", root / "export") == 0
    out = root / "results.json"
    rc = run_cli(
        "eval",
        "--checkpoint",
        root / "nano.pt",
        "--data",
        root / "demo",
        "--tasks",
        "zeroshot,retrieval",
        "--workers",
        "0",
        "--batch-size",
        "16",
        "--quiet",
        "--out",
        out,
    )
    assert rc == 0
    clip, _, transform = open_clip.create_model_and_transforms(f"local-dir:{root / 'export'}")
    return (
        root,
        json.loads(out.read_text())["metrics"],
        clip.eval(),
        transform,
        open_clip.get_tokenizer(f"local-dir:{root / 'export'}"),
    )


def test_zero_shot_classification_agrees_with_clip_benchmark(setup):
    root, ours, clip, transform, tokenizer = setup
    dataset = _Records(root / "demo", transform, "label")
    templates = [
        t.replace("{}", "{c}")
        for t in json.loads((root / "demo" / "classes.json").read_text())["classification"]["templates"]
    ]
    theirs = cb_classification.evaluate(
        clip,
        DataLoader(dataset, batch_size=16),
        tokenizer,
        dataset.classes,
        templates,
        device="cpu",
        amp=False,
    )
    assert ours["zeroshot/top1"] == pytest.approx(100 * theirs["acc1"])
    assert ours["zeroshot/top5"] == pytest.approx(100 * theirs["acc5"])
    assert ours["zeroshot/mean_per_class"] == pytest.approx(100 * theirs["mean_per_class_recall"])


def test_retrieval_agrees_with_clip_benchmark(setup):
    root, ours, clip, transform, tokenizer = setup
    loader = DataLoader(
        _Records(root / "demo", transform, "texts"), batch_size=16, collate_fn=_with_text_lists
    )
    theirs = cb_retrieval.evaluate(clip, loader, tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        # clip_benchmark's "image retrieval" is text -> image; its "text retrieval" image -> text
        assert ours[f"retrieval/text_to_image_R@{k}"] == pytest.approx(
            100 * theirs[f"image_retrieval_recall@{k}"]
        )
        assert ours[f"retrieval/image_to_text_R@{k}"] == pytest.approx(
            100 * theirs[f"text_retrieval_recall@{k}"]
        )
    # the comparison is not vacuous: a random model is far from both 0 and 100 at R@10
    assert 0 < ours["retrieval/text_to_image_R@10"] < 100
