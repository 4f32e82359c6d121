"""``dreamlip train``: see :mod:`dreamlip.train`."""

from __future__ import annotations

import argparse

from dreamlip.config import ABLATION_VARIANTS, list_presets, load_config
from dreamlip.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="training data SPEC (docs/data.md); overrides data.train")
    parser.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, tensorboard/")
    parser.add_argument("--preset", help=f"named preset: {', '.join(list_presets())}")
    parser.add_argument("--config", help="a YAML config file (applied after the preset)")
    parser.add_argument("--variant", help=f"ablation rung (after --config): {', '.join(ABLATION_VARIANTS)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, last of all, e.g. --set optim.lr=1e-3 (repeatable)")
    parser.add_argument("--resume", help="'latest' (newest checkpoint in --out) or a checkpoint path")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.preset, args.config, args.overrides, variant=args.variant)
    if args.data:
        config.data.train = args.data
    summary = train(config, args.out, resume=args.resume)
    if summary["final"]:
        print(f"done: {summary['steps']} steps, final loss {summary['final']['loss']:.4f}, run in {args.out}")
    return 0
