"""``dreamlip export``: a checkpoint as an open_clip ``local-dir:`` model (:mod:`dreamlip.export`)."""

from __future__ import annotations

import argparse
import json
import sys

from dreamlip.export import export_open_clip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a dreamlip checkpoint (dreamlip train)")
    parser.add_argument("--out", required=True, help="output directory (open_clip local-dir: layout)")


def run(args: argparse.Namespace) -> int:
    from dreamlip.checkpoint import NotADreamLIPCheckpoint
    from dreamlip.loading import load_model

    try:
        loaded = load_model(args.checkpoint)
        out = export_open_clip(loaded.model, loaded.info["model_name"], args.out, loaded.objective)
    except (NotADreamLIPCheckpoint, ValueError, FileNotFoundError) as err:
        print(f"dreamlip export: error: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": str(out),
                "model_name": loaded.info["model_name"],
                "step": loaded.info.get("step"),
                "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')",
            },
            indent=2,
        )
    )
    return 0
