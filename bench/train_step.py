"""Time dreamlip's training step against open_clip's plain CLIP step, in one run, on one batch.

Baseline: open_clip model + ``open_clip.loss.ClipLoss``, one raw caption per image padded to the
77-token context (what open_clip_train does). Ours, through the trainer's own step function:
K = 0 (plain CLIP through dreamlip), K = 6 with and without the grouping loss, and SigLIP's
objective on the same K + 1 texts. Every variant runs forward,
backward and an AdamW step on the same model weights and images; steps alternate between variants
so machine noise hits all of them alike. Prints median step times and, as the ratio to the
baseline, the median over rounds of each round's ratio (a round times every variant back to back,
so slow drift in machine load cancels), and with ``--peak-tflops`` the model FLOP utilisation
(FLOPs counted with torch's FlopCounterMode).

    python bench/train_step.py                                  # tiny demo model, CPU
    python bench/train_step.py --model ViT-B-16 --batch 256 --device cuda --peak-tflops 989
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamlip._compat import ensure_torchvision
from dreamlip.captions import SubcaptionSampler
from dreamlip.synthetic import make_record
from dreamlip.distributed import init_distributed, make_strategy
from dreamlip.model import create_model, get_tokenizer
from dreamlip.objectives import DreamLIPObjective, Objective, SigLIPObjective
from dreamlip.train import TrainModule, TrainStep

ensure_torchvision()  # open_clip imports torchvision, which next to a CPU torch needs it
from open_clip.loss import ClipLoss  # noqa: E402


def _texts(batch: int, k: int) -> list[list[str]]:
    """Realistic captions: the synthetic set's alt-text and sub-captions (10-30 tokens each)."""
    sampler = SubcaptionSampler(k=k)
    rows = []
    for index in range(batch):
        record, _, _ = make_record("train", index, 0, 64)
        rows.append(sampler.sample(record["raw_caption"], record["captions"], index=index))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DreamLIP-ViT-Tiny-64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _, _ = create_model(args.model, device=device)
    tokenizer = get_tokenizer(args.model)
    size = model.clip.visual.image_size
    images = torch.randn(args.batch, 3, *size, device=device)
    captions = _texts(args.batch, args.k)
    raw_tokens = tokenizer([row[0] for row in captions]).to(device)  # [B, 77], as open_clip_train feeds it
    all_tokens = tokenizer([t for row in captions for t in row]).reshape(args.batch, args.k + 1, -1).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type in ("cpu", "cuda"))  # as the trainer
    clip_loss = ClipLoss()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def open_clip_step():
        with autocast():
            image_features, text_features, logit_scale = model.clip(images, raw_tokens)
        clip_loss(image_features.float(), text_features.float(), logit_scale).backward()

    def ours(k: int, objective: Objective, text_buckets: int = model.text_buckets):
        """The trainer's step with ``objective`` (K + 1 texts an image), on the shared model."""
        batch = {"images": images, "texts": all_tokens[:, : k + 1]}
        strategy = make_strategy("ddp", init_distributed(args.device))  # one process: the module as it is
        strategy.wrap(TrainModule(model, objective.to(device)))
        train_step = TrainStep(strategy, autocast=autocast, scaler=scaler)

        def step():
            model.text_buckets = text_buckets
            return train_step([batch])

        return step

    def dreamlip(k: int, **settings) -> DreamLIPObjective:
        return DreamLIPObjective(text_slots=k + 1, **settings)

    variants = {
        "open_clip CLIP (77 tokens)": open_clip_step,
        "dreamlip K=0": ours(0, dreamlip(0)),
        f"dreamlip K={args.k}": ours(args.k, dreamlip(args.k, group_weight=0.0)),
        f"dreamlip K={args.k} + grouping": ours(args.k, dreamlip(args.k)),
        "  same, text not bucketed": ours(args.k, dreamlip(args.k), text_buckets=1),
        f"siglip K={args.k}": ours(args.k, SigLIPObjective()),
    }

    def run(step) -> float:
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    flops = {}
    for name, step in variants.items():
        with FlopCounterMode(display=False) as counter:
            optimizer.zero_grad(set_to_none=True)
            step()
        flops[name] = counter.get_total_flops()
        for _ in range(args.warmup):
            run(step)
    times = {name: [] for name in variants}
    for _ in range(args.steps):  # interleaved, so drift in machine load is shared
        for name, step in variants.items():
            times[name].append(run(step))

    baseline = times["open_clip CLIP (77 tokens)"]
    print(f"model {args.model}, batch {args.batch}, device {device}, {args.steps} steps each (median)")
    print(f"{'variant':34s} {'step ms':>9s} {'ratio':>7s} {'GFLOP':>9s}" + ("   MFU" if args.peak_tflops else ""))
    results = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        ratio = statistics.median(step / base for step, base in zip(samples, baseline))
        row = {"step_ms": 1000 * median, "ratio_to_open_clip": ratio, "gflop": flops[name] / 1e9}
        line = f"{name:34s} {row['step_ms']:9.1f} {row['ratio_to_open_clip']:7.2f} {row['gflop']:9.1f}"
        if args.peak_tflops:
            row["mfu"] = flops[name] / median / (args.peak_tflops * 1e12)
            line += f" {100 * row['mfu']:5.1f}%"
        results[name] = row
        print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
