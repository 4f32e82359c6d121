"""``dreamlip eval`` on bad input, as its image workers meet it: a retrieval JSONL with a broken
line, a missing or truncated image (in classification, retrieval and segmentation, read by 2 worker
processes): one line naming the file (and line), exit status 2, no worker traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import NANO
from dreamlip.checkpoint import save_checkpoint
from dreamlip.cli import main
from dreamlip.model import create_model
from dreamlip.synthetic import generate


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_checkpoint(path, {"model_name": NANO, "model": create_model(NANO)[0].state_dict(), "config": {}, "step": 0})


@pytest.fixture
def demo(tmp_path) -> Path:
    generate(tmp_path / "demo", n_train=0, n_test=6, image_size=32, seed=0)
    return tmp_path / "demo"


def evaluate(checkpoint: Path, data: Path, tasks: str, capsys) -> tuple[int, str]:
    code = main(["eval", "--checkpoint", str(checkpoint), "--data", str(data), "--tasks", tasks, "--workers", "2",
                 "--batch-size", "2", "--quiet"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.fault("eval: a retrieval JSONL with a bad line")
def test_a_bad_retrieval_jsonl_line_is_named_by_file_and_line(demo, checkpoint, tmp_path, capsys, observe):
    records = [json.loads(line) for line in (demo / "test.jsonl").read_text().splitlines()]
    lines = [json.dumps({"image": str(demo / r["image"]), "caption": r["raw_caption"]}) for r in records]
    lines[3] = lines[3][:-20]  # cut mid-string
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines[:2] + [""] + lines[2:]) + "\n")  # a blank line before: line 5 is the bad one
    code, err = evaluate(checkpoint, data, "retrieval", capsys)
    observe(f"rc {code}: {err}")
    assert code == 2
    assert err.startswith(f"dreamlip eval: error: {data}:5: not valid JSON (Unterminated string starting at")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("tasks", "fault"),
    [pytest.param(tasks, fault, marks=pytest.mark.fault(f"eval: a {fault} image ({tasks})"))
     for tasks in ("zeroshot", "retrieval", "segmentation") for fault in ("missing", "truncated")],
)
def test_an_unreadable_image_read_by_a_worker_is_one_line_naming_it(demo, checkpoint, capsys, observe, tasks, fault):
    image = demo / json.loads((demo / "test.jsonl").read_text().splitlines()[3])["image"]
    if fault == "missing":
        image.unlink()
    else:
        image.write_bytes(image.read_bytes()[:100])
    code, err = evaluate(checkpoint, demo, tasks, capsys)
    observe(f"rc {code}: {err}")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"dreamlip eval: error: {image}: {fault}_image: ")
