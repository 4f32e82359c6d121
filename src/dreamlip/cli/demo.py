"""``dreamlip demo``: see :mod:`dreamlip.demo`."""

from __future__ import annotations

import argparse
import dataclasses

import matplotlib

from dreamlip.config import ABLATION_VARIANTS, coerce_dataclass
from dreamlip.demo import DemoSettings, run_demo
from dreamlip.synthetic import DATA_KINDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DemoSettings()
    parser.add_argument("--out", required=True, help="output directory (data/, runs/, results.json, report.html)")
    parser.add_argument("--dataset", choices=DATA_KINDS, default=defaults.dataset,
                        help="synthetic: the embedded set (default); real: the real-image development set (docs/real-data.md)")
    parser.add_argument("--n-train", type=int, default=defaults.n_train)
    parser.add_argument("--n-test", type=int, default=defaults.n_test)
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per model")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--k", type=int, default=defaults.k, help="sub-captions per image for DreamLIP")
    parser.add_argument("--long-mode", choices=("sentences", "whole", "sentences+whole"), default=defaults.long_mode,
                        help="DreamLIP's long captions in the sub-caption pool: split into sentences, whole, or both")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--heatmap-images", type=int, default=defaults.heatmap_images)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help="held-out eval during training every N steps (default: a third of the steps, rounded up; 0: off)")
    parser.add_argument("--ranks", type=int, default=defaults.ranks,
                        help="training processes (gloo) sharing the cores, each a slice of the same global batch")
    parser.add_argument("--models", default=",".join(defaults.models), metavar="NAME,NAME,...",
                        help=f"training variants to train and compare side by side, the first the reference (default "
                             f"%(default)s); choices: {', '.join(ABLATION_VARIANTS)}")
    parser.add_argument("--record", metavar="FILE",
                        help="also merge results.json, with the command, commit and machine, into this results file "
                             "(bench/results/demo.json, which bench/render_results.py renders into the README)")


def run(args: argparse.Namespace) -> int:
    matplotlib.use("Agg")  # the report's figures go to files; a library import leaves the backend alone
    names = [f.name for f in dataclasses.fields(DemoSettings)]
    settings = coerce_dataclass(DemoSettings, {name: getattr(args, name) for name in names}, "dreamlip demo")
    if args.record:
        from dreamlip.results import provenance, record_run

        made_by = provenance(program="dreamlip")  # the code as it was when the run started
    results = run_demo(args.out, settings)
    if args.record:
        changed = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in dataclasses.asdict(settings).items()
                   if v != getattr(DemoSettings(), k)]
        record_run(args.record, ",".join(changed) or "default", results | {"provenance": made_by})
    return 0
