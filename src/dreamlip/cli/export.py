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
    from dreamlip.checkpoint import NotADreamLIPCheckpoint, load_model

    try:
        model, _, _, payload = load_model(args.checkpoint)
        out = export_open_clip(model, payload["model_name"], args.out)
    except (NotADreamLIPCheckpoint, ValueError) as err:
        print(f"dreamlip export: error: {err}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "out": str(out),
                "model_name": payload["model_name"],
                "step": payload.get("step"),
                "load_with": f"open_clip.create_model_and_transforms('local-dir:{out}')",
            },
            indent=2,
        )
    )
    return 0
