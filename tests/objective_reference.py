"""Short training runs whose per-step losses and final weights pin the DreamLIP objective bit for bit.

``objective_reference.json`` was written by this module (``python tests/objective_reference.py``)
with the trainer as it was before the objective became a boundary (``dreamlip.objectives``); the
test of that file re-runs every case and asserts the same losses and the same weights, so the
refactor and everything after it train exactly what the demo trained. The cases: the demo recipe
itself (its preset, tiny ViT, K = 6, cross-image grouping) and the DreamLIP options that take
other code paths (plain CLIP, the paper's negatives with the global temperature and a warm-up,
token-level grouping, batch negatives without the text gradient, accumulation with gathered
negatives and clipping). Regenerate the file only for a change that is meant to change training.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).with_name("objective_reference.json")
NANO = "DreamLIP-ViT-Nano-32"
# Every case runs the demo preset on the data_dir fixture's data (generate(n_train=64, n_test=8, image_size=32)).
# The grouping weight constant and its text gradient on from the first step, as every case trained when the file
# was written (the default now ramps the weight and starts the text gradient at the run's half); the text tower
# bucketed, not packed (the default packs: the same forward, weight gradients summed in another order).
COMMON = {"data.workers": 0, "run.progress": False, "run.log_every": 1, "optim.warmup_steps": 2, "optim.lr": 2e-3,
          "loss.group_warmup_fraction": 0.0, "loss.group_text_grad": True, "loss.group_text_grad_start": 0.0,
          "model.text_packing": False}
CASES: dict[str, dict[str, Any]] = {
    "demo": {"optim.batch_size": 32, "optim.max_steps": 3},
    "clip": {"variant": "clip", "optim.batch_size": 32, "optim.max_steps": 3},
    "image-global-all-warmup": {
        "model.name": NANO, "optim.batch_size": 16, "optim.max_steps": 3, "captions.k": 3,
        "loss.group_negatives": "image", "loss.group_temperature": "global", "loss.group_slots": "all",
        "loss.group_warmup_steps": 2, "loss.group_weight": 0.5,
    },
    "token": {
        "model.name": NANO, "optim.batch_size": 16, "optim.max_steps": 3, "captions.k": 2,
        "loss.group_granularity": "token", "loss.group_negatives": "image",
    },
    "batch-negatives-no-text-grad": {
        "model.name": NANO, "optim.batch_size": 16, "optim.max_steps": 3, "captions.k": 3,
        "loss.group_negatives": "batch", "loss.group_text_grad": False, "loss.group_weights_grad": False,
        "loss.group_temperature_init": 0.05, "loss.group_temperature_min": 0.02,
    },
    "accumulate-gathered-clipped": {
        "model.name": NANO, "optim.batch_size": 8, "optim.accum_steps": 2, "optim.max_steps": 3, "captions.k": 3,
        "loss.group_gather": True, "loss.local_loss": True, "optim.grad_clip": 0.5,
    },
}


def platform() -> dict[str, str]:
    """What bit-identical float results depend on besides the code."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def weight_digests(checkpoint: dict[str, Any]) -> dict[str, str]:
    """sha256 (64 bits of it) of every trained tensor's bytes, keyed ``model.<name>`` and ``objective.<name>``."""
    tensors = {f"model.{name}": tensor for name, tensor in checkpoint["model"].items()}
    tensors |= {f"objective.{name}": tensor for name, tensor in checkpoint.get("objective", {}).items()}
    # Written before the objective owned its parameters: the grouping temperature was the model's.
    if "model.local_logit_scale" in tensors:
        tensors["objective.local_logit_scale"] = tensors.pop("model.local_logit_scale")
    return {name: hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()[:16] for name, tensor in sorted(tensors.items())}


def run_case(name: str, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train case ``name`` into ``out_dir``: its per-step losses and final weights' digests."""
    from dreamlip.checkpoint import load_checkpoint
    from dreamlip.config import load_config
    from dreamlip.train import train

    settings = dict(CASES[name])
    variant = settings.pop("variant", None)
    fields = {"data.train": str(data_dir / "train.jsonl"), **COMMON, **settings}
    train(load_config("demo", fields, variant=variant), out_dir)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [record["loss"] for record in records], "weights": weight_digests(load_checkpoint(out_dir / "model.pt"))}


def main() -> None:
    from dreamlip.synthetic import generate

    torch.set_num_threads(1)  # as the test suite runs (conftest.one_thread)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, n_train=64, n_test=8, image_size=32, seed=0)
        cases = {name: run_case(name, data, Path(tmp) / name) for name in CASES}
    FIXTURE.write_text(json.dumps({"platform": platform(), "cases": cases}, indent=1) + "\n")
    print(f"wrote {FIXTURE}", file=sys.stderr)


if __name__ == "__main__":
    main()
