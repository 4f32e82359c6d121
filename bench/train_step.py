"""Time each objective's training step against open_clip's plain CLIP step, in one run, on one batch.

Baseline: open_clip model + ``open_clip.loss.ClipLoss``, one raw caption per image padded to the
77-token context (what open_clip_train does). Ours, through the trainer's own step function with
each objective as ``dreamlip train --variant NAME`` builds it: ``clip`` (K = 0), ``short`` (K
sub-captions, no grouping term), ``dreamlip`` (the default: K sub-captions and the cross-image
grouping term, its text tower packed as ``model.text_packing=auto`` gives), the same with the text
tower bucketed but not packed and with it neither, ``siglip``, ``flair``, ``flair+dreamlip``
(both objectives' terms, docs/method.md "Combining objectives"), ``cosmos`` and ``cosmos+dreamlip`` (its own K; its batch
of multi-crop views and text crops made by the trainer's data path, its EMA teacher's forward and
update timed and counted). Every variant runs forward, backward and an AdamW step on the same model
weights; steps alternate between variants so machine noise hits all of them alike.

Per variant: the median step time; its ratio to the baseline, as the median over rounds of each
round's ratio (a round times every variant back to back, so slow drift in machine load cancels)
with the interquartile range; the FLOPs (torch's FlopCounterMode: matrix products, convolutions,
attention) and their ratio to the baseline's; and the time ratio over the FLOP ratio (1.0: the
step costs what its FLOPs say). With ``--peak-tflops`` also the model FLOP utilisation.

    python bench/train_step.py                                  # tiny demo model, CPU
    python bench/train_step.py --record bench/results/train_step.json   # then
    python bench/render_results.py                              # re-renders docs/speed.md
    python bench/train_step.py --model ViT-B-16 --batch 256 --device cuda --peak-tflops 989
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import time

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from dreamlip._compat import ensure_torchvision
from dreamlip.captions import SubcaptionSampler
from dreamlip.config import load_config
from dreamlip.data.loader import Collator, SampleLoader
from dreamlip.data.records import Record
from dreamlip.distributed import init_distributed, make_strategy
from dreamlip.model import create_model, get_tokenizer
from dreamlip.objectives import Objective, build_objective
from dreamlip.results import provenance, record_run
from dreamlip.synthetic import make_record
from dreamlip.train import TrainModule, TrainStep, sampler_and_transform

ensure_torchvision()  # open_clip imports torchvision, which next to a CPU torch needs it
from open_clip.loss import ClipLoss  # noqa: E402

BASELINE = "open_clip"
# (row, the `dreamlip train --variant` it runs, its --set overrides, whether the text tower runs bucketed)
VARIANTS = (
    ("clip", "clip", (), True),
    ("short", "short", (), True),
    ("dreamlip", "dreamlip", (), True),
    ("dreamlip-unpacked", "dreamlip", ("model.text_packing=false",), True),
    ("dreamlip-unbucketed", "dreamlip", ("model.text_packing=false",), False),
    ("siglip", "siglip", (), True),
    ("flair", "flair", (), True),
    # The combinations as their quality was measured (docs/results.md): the grouping term's text gradient on from the first step.
    ("flair+dreamlip", "flair", ("loss.objective=flair+dreamlip", "loss.group_text_grad_start=0"), True),
    ("cosmos", "cosmos", (), True),
    ("cosmos+dreamlip", "cosmos", ("loss.objective=cosmos+dreamlip", "loss.global_weight=0", "loss.group_text_grad_start=0"), True),
)


def _texts(batch: int, k: int) -> list[list[str]]:
    """Realistic captions: the synthetic set's alt-text and sub-captions (10-30 tokens each)."""
    sampler = SubcaptionSampler(k=k)
    rows = []
    for index in range(batch):
        record, _, _ = make_record("train", index, 0, 64)
        rows.append(sampler.sample(record["raw_caption"], record["captions"], index=index))
    return rows


def _label(row: str, config) -> str:
    """The table's name of ``row``, which runs ``config``."""
    k = config.captions.k
    return {
        "clip": "clip: CLIP through dreamlip (K = 0)",
        "short": f"short: K = {k} sub-captions, no grouping",
        "dreamlip": f"dreamlip: K = {k} + cross-image grouping (the default, its text gradient on as in the run's second half)",
        "dreamlip-unpacked": "dreamlip, text bucketed, not packed (model.text_packing=false)",
        "dreamlip-unbucketed": "dreamlip, text neither bucketed nor packed",
        "siglip": f"siglip: K = {k}, sigmoid loss",
        "flair": f"flair: K = {k}, text-conditioned pooling",
        "flair+dreamlip": f"flair+dreamlip: K = {k}, both objectives' terms (the grouping term's text gradient on)",
        "cosmos": f"cosmos: 2 + {config.loss.cosmos_local_crops} crops, {k + 1} text crops, EMA teacher",
        "cosmos+dreamlip": "cosmos+dreamlip: COSMOS's, and DreamLIP's grouping term on the first global view (its text gradient on)",
    }[row]


def _view_batch(config, objective: Objective, model, tokenizer, batch: int) -> dict[str, torch.Tensor]:
    """A batch of several views of each sample (COSMOS's), made as the trainer's loader makes it:
    its sampler and transform, each sample through ``SampleLoader`` (encoded image bytes in), the
    batch through ``Collator``."""
    sampler, transform = sampler_and_transform(config, objective, model, None)
    load = SampleLoader(sampler, transform, seed=config.run.seed)
    samples = []
    for index in range(batch):
        record, rgb, _ = make_record("train", index, 0, 64)
        png = io.BytesIO()
        Image.fromarray(rgb).save(png, format="PNG")
        sample = load(Record(str(index), png.getvalue(), record["raw_caption"], record["captions"]), epoch=0)
        samples.append(sample | {"skips": {}})  # none skipped: the stream adds the count
    collated = Collator(tokenizer)(samples)
    return {name: collated[name] for name in ("images", "local_images", "texts")}


def _summary(samples: list[float], baseline: list[float], flops: int, base_flops: int) -> dict[str, float | list[float]]:
    ratios = [step / base for step, base in zip(samples, baseline)]
    ratio = statistics.median(ratios)
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratio] * 3
    return {
        "step_ms": 1000 * statistics.median(samples),
        "ratio_to_open_clip": ratio,
        "ratio_iqr": [quartiles[0], quartiles[2]],
        "gflop": flops / 1e9,
        "flop_ratio": flops / base_flops,
        "time_over_flop_ratio": ratio / (flops / base_flops),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DreamLIP-ViT-Tiny-64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=6, help="sub-captions per image (clip runs K = 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (rounds)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=[row[0] for row in VARIANTS], default=[row[0] for row in VARIANTS])
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--record", metavar="FILE",
                        help="also merge the run, with its settings, command, commit and machine, into this results "
                             "file (bench/results/train_step.json, which bench/render_results.py renders)")
    args = parser.parse_args()
    made_by = provenance()
    load_at_start = os.getloadavg()[0]

    torch.manual_seed(0)
    device = torch.device(args.device)
    model, _, _ = create_model(args.model, device=device)
    tokenizer = get_tokenizer(args.model)
    size = model.clip.visual.image_size
    images = torch.randn(args.batch, 3, *size, device=device)
    captions = _texts(args.batch, args.k)
    raw_tokens = tokenizer([row[0] for row in captions]).to(device)  # [B, 77], as open_clip_train feeds it
    all_tokens = tokenizer([t for row in captions for t in row]).reshape(args.batch, args.k + 1, -1).to(device)
    clip_loss = ClipLoss()
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def open_clip_step():
        with autocast():
            image_features, text_features, logit_scale = model.clip(images, raw_tokens)
        clip_loss(image_features.float(), text_features.float(), logit_scale).backward()

    last_step = args.warmup + args.steps - 1  # the step the variants are timed at: the run's last, every schedule at full cost

    def ours(objective: Objective, batch: dict[str, torch.Tensor], bucketed: bool, packed: bool):
        """The trainer's step with ``objective`` on ``batch``, on the shared model: forward, backward
        and the objective's after-backward update (COSMOS's teacher EMA)."""
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        objective.bind(model)
        strategy = make_strategy("ddp", init_distributed(args.device))  # one process: the module as it is
        strategy.wrap(TrainModule(model, objective))
        train_step = TrainStep(strategy, autocast=autocast, scaler=scaler)
        text_buckets = model.text_buckets if bucketed else 1

        def step():
            model.text_buckets, model.text_packing = text_buckets, packed
            result = train_step([batch], last_step)
            objective.after_backward(model, last_step, last_step + 1)
            return result

        return step

    steps, labels, parameters = {BASELINE: open_clip_step}, {BASELINE: "open_clip CLIP (77 tokens)"}, list(model.parameters())
    for row, variant, overrides, bucketed in VARIANTS:
        if row in args.variants:
            config = load_config(None, {"captions.k": args.k}, overrides, variant=variant)
            k = config.captions.k
            objective = build_objective(config.loss, text_slots=k + 1, embed_dim=model.embed_dim).to(device)
            objective.set_run_length(last_step + 1)  # as the trainer does; a ramp scales a term, not its cost
            parameters += [p for p in objective.parameters() if p.requires_grad]
            if objective.views is None:
                batch = {"images": images, "texts": all_tokens[:, : k + 1]}
            else:
                batch = _view_batch(config, objective, model, tokenizer, args.batch)
            packed = model.resolve_text_packing(config.model.text_packing)  # as the trainer resolves it, one process
            steps[row], labels[row] = ours(objective, batch, bucketed, packed), _label(row, config)
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=device.type in ("cpu", "cuda"))  # as the trainer

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
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            optimizer.zero_grad(set_to_none=True)
            step()
        flops[name] = counter.get_total_flops()
        for _ in range(args.warmup):
            run(step)
    times = {name: [] for name in steps}
    for _ in range(args.steps):  # interleaved, so drift in machine load is shared
        for name, step in steps.items():
            times[name].append(run(step))

    print(f"model {args.model}, batch {args.batch}, K {args.k}, device {device}, {torch.get_num_threads()} threads, "
          f"{args.steps} rounds (medians; load average {load_at_start:.2f} at start)")
    print(f"{'variant':52s} {'step ms':>8s} {'ratio':>6s} {'IQR':>11s} {'GFLOP':>7s} {'FLOP r':>6s} {'t/FLOP':>6s}"
          + ("   MFU" if args.peak_tflops else ""))
    results = {}
    for name, samples in times.items():
        row = {"label": labels[name]} | _summary(samples, times[BASELINE], flops[name], flops[BASELINE])
        line = (f"{row['label']:52s} {row['step_ms']:8.1f} {row['ratio_to_open_clip']:6.2f} "
                f"{row['ratio_iqr'][0]:5.2f}-{row['ratio_iqr'][1]:<5.2f} {row['gflop']:7.2f} {row['flop_ratio']:6.2f} "
                f"{row['time_over_flop_ratio']:6.2f}")
        if args.peak_tflops:
            row["mfu"] = flops[name] / (row["step_ms"] / 1000) / (args.peak_tflops * 1e12)
            line += f" {100 * row['mfu']:5.1f}%"
        results[name] = row
        print(line)
    settings = {"model": args.model, "batch": args.batch, "k": args.k, "device": str(device),
                "threads": torch.get_num_threads(), "rounds": args.steps, "warmup": args.warmup}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)
    if args.record:
        key = f"{args.model}/{device}/batch{args.batch}/k{args.k}"
        rows = [{"name": name} | row for name, row in results.items()]  # a list: the file's keys are sorted
        record_run(args.record, key, {"settings": settings, "load_average_at_start": load_at_start,
                                      "results": rows, "provenance": made_by})


if __name__ == "__main__":
    main()
