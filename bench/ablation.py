"""The paper's ablation ladder on a demo dataset (synthetic, or --dataset real), over several seeds.

Rungs (METHOD.md): CLIP (raw caption only); + long caption as one text; + sub-caption sampling;
+ short captions; + grouping loss. Every rung trains the same model for the same steps on the same
data; each seed changes the initialisation, the data order and the sub-caption draws. Prints the
mean and spread (sample standard deviation) per rung and metric, and writes every run's numbers.
Segmentation is scored with the raw patch tokens ("seg mIoU") and with every dense read-out, each
also objects only ("obj", background pixels left out as VOC20 scores them) and with background told
by a threshold calibrated on training masks ("cal").

    python bench/ablation.py --out ablation-out                # defaults: 3 seeds, 400 steps (the demo's)
    python bench/ablation.py --out ablation-out --steps 100 --seeds 0 1 --n-train 1000  # quicker
    python bench/ablation.py --out ablation-out --variants subcaptions --set captions.merge=3 --tag merge3
    python bench/ablation.py --out ablation-real --dataset real --variants clip short dreamlip
    python bench/ablation.py --out ablation-out --record bench/results/ablation-embedded.json  # then
    python bench/render_results.py                                                           # re-renders docs/results.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dreamlip.loading import load_model
from dreamlip.config import ABLATION_VARIANTS, load_config
from dreamlip.synthetic import DATA_KINDS, generator
from dreamlip.eval import TASK_NAMES, Conditioning, build_tasks, evaluate
from dreamlip.eval.dense import DENSE_READOUTS
from dreamlip.results import provenance, record_run
from dreamlip.train import train

METRICS = (
    ("retrieval/image_to_text_R@1", "I→T R@1"),
    ("retrieval/text_to_image_R@1", "T→I R@1"),
    ("long_retrieval/image_to_text_R@1", "long I→T R@1"),
    ("long_retrieval/text_to_image_R@1", "long T→I R@1"),
    ("zeroshot/top1", "zero-shot top1"),
    ("linear_probe/top1", "linear probe"),
    ("segmentation/mIoU", "seg mIoU"),
    # the dense read-outs of the last block (dreamlip.eval.dense), from one shared trunk per image
    *((f"segmentation/{readout}/mIoU", f"seg {readout}") for readout in DENSE_READOUTS if readout != "raw"),
    # objects only, as VOC20 is scored: background pixels left out and never predicted
    ("segmentation/objects/mIoU", "obj raw"),
    *((f"segmentation/{readout}/objects/mIoU", f"obj {readout}") for readout in DENSE_READOUTS if readout != "raw"),
    # background by a threshold chosen on 100 training images' masks (docs/eval.md, step 3)
    ("segmentation/calibrated/mIoU", "cal raw"),
    *((f"segmentation/{readout}/calibrated/mIoU", f"cal {readout}") for readout in DENSE_READOUTS if readout != "raw"),
)


def _evaluate(run_dir: Path, tasks: list, device: str) -> dict[str, float]:
    """The run's metrics; an objective with a text-conditioned pooler (FLAIR's) is also scored its
    own way, every pair (``<task>/conditioned_<metric>``, docs/eval.md)."""
    loaded = load_model(run_dir / "model.pt", device=device)
    pooler = loaded.objective.conditioned_pooler if loaded.objective is not None else None
    conditioning = Conditioning(pooler, "all") if pooler is not None else None
    return evaluate(loaded.model, loaded.tokenizer, loaded.eval_transform, tasks, device=device, progress=False,
                    conditioning=conditioning)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=300)
    parser.add_argument("--dataset", choices=DATA_KINDS, default="synthetic",
                        help="the demo-data kind to train and score on (default synthetic)")
    parser.add_argument("--variants", nargs="+", default=list(ABLATION_VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a config change on top of every rung, e.g. captions.merge=3 (repeatable)")
    parser.add_argument("--device", default="auto", help="train and score here (auto: cuda when there is one, else cpu)")
    parser.add_argument("--tag", default="", help="suffix of the rung names, to keep runs with --set apart")
    parser.add_argument("--record", metavar="FILE",
                        help="also merge each run, with its settings, command, commit and machine, into this "
                             "results file (bench/results/*.json, which bench/render_results.py renders)")
    args = parser.parse_args()
    if args.overrides and not args.tag:
        parser.error("--set needs a --tag, so its runs don't mix with the plain rungs")
    names = {variant: f"{variant}+{args.tag}" if args.tag else variant for variant in args.variants}
    made_by = provenance()  # the code as it was when the runs started
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    out = Path(args.out)
    data = out / "data"
    # one dataset: seeds vary training only; reused when already there, as other invocations may be reading it
    generator(args.dataset)(data, n_train=args.n_train, n_test=args.n_test, seed=0, reuse=True)
    # long_text "full": texts up to the model's context; for 77-token models the same as "truncate"
    tasks = build_tasks(data, TASK_NAMES, long_text="full", dense=",".join(DENSE_READOUTS), calibrate="train")
    results_path = out / "runs.json"
    runs = json.loads(results_path.read_text()) if results_path.exists() else {}
    study = {"dataset": args.dataset, "steps": args.steps, "batch_size": args.batch_size, "k": args.k,
             "n_train": args.n_train, "n_test": args.n_test, "set": args.overrides}

    def keep(key: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Merge into runs.json and, with --record, into the results file with the study's settings."""
        merged = record_run(results_path, key, entry)
        if args.record:
            record_run(args.record, key, merged[key] | {"settings": study})
        return merged

    for variant in args.variants:
        for seed in args.seeds:
            key = f"{names[variant]}/seed{seed}"
            run_dir = out / "runs" / names[variant] / f"seed{seed}"
            if key in runs:  # trained in an earlier invocation; run again only the tasks of metrics it lacks
                missing = {metric.split("/", 1)[0] for metric, _ in METRICS if metric not in runs[key]}
                if missing:
                    metrics = _evaluate(run_dir, [task for task in tasks if task.name in missing], device)
                    runs = keep(key, metrics | {"eval_provenance": made_by})
                elif args.record:
                    keep(key, {})
                continue
            settings = {
                "data.train": str(data / "train.jsonl"),
                "optim.max_steps": args.steps,
                "optim.batch_size": args.batch_size,
                "captions.k": args.k,
                "run.seed": seed,
                "run.save_every": args.steps,
                "run.progress": False,
                "run.device": device,
            }
            config = load_config("demo", settings, args.overrides, variant=variant)
            started = time.perf_counter()
            train(config, run_dir)
            metrics = _evaluate(run_dir, tasks, device)
            runs = keep(key, metrics | {"train_seconds": time.perf_counter() - started, "provenance": made_by})
            print(f"{key}: " + ", ".join(f"{label} {runs[key][m]:.1f}" for m, label in METRICS), flush=True)

    print(f"\n{len(args.seeds)} seeds, {args.steps} steps x {args.batch_size}, mean ± std")
    print(f"{'rung':20s}" + "".join(f"{label:>16s}" for _, label in METRICS))
    table = {}
    for variant in args.variants:
        name = names[variant]
        cells, table[name] = [], {}
        for metric, _ in METRICS:
            values = [runs[f"{name}/seed{s}"][metric] for s in args.seeds]
            mean = statistics.mean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            table[name][metric] = {"mean": mean, "std": spread, "values": values}
            cells.append(f"{mean:8.1f} ± {spread:4.1f}")
        print(f"{name:20s}" + "".join(f"{c:>16s}" for c in cells))
    baselines = next(task for task in tasks if task.name == "segmentation").constant_baselines()
    background, commonest = baselines["background_everywhere"], baselines["commonest_shape_everywhere"]
    print(f"constant baselines: background everywhere seg mIoU {background['segmentation/mIoU']:.1f}; objects only, "
          f"the commonest shape ({commonest['shape']}) everywhere obj mIoU {commonest['segmentation/objects/mIoU']:.1f}")
    table_path = out / (f"ablation-{args.tag}.json" if args.tag else "ablation.json")
    table_path.write_text(json.dumps({"args": vars(args), "table": table, "baselines": baselines}, indent=2))


if __name__ == "__main__":
    main()
