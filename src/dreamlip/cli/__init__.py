"""The ``dreamlip`` command: one entry point, one module per subcommand.

All argument parsing lives in this package: each subcommand is a module ``dreamlip.cli.NAME``
defining ``add_arguments(parser)`` and ``run(args) -> int`` over the library's functions. Modules
are imported only when their subcommand runs, so ``dreamlip --help`` does not load torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo-data": ("dreamlip.cli.demo_data", "render the embedded synthetic long-caption dataset, or (--kind real) the real-image one"),
    "train": ("dreamlip.cli.train", "train a DreamLIP (or plain CLIP) model"),
    "eval": ("dreamlip.cli.eval", "zero-shot classification, retrieval, segmentation and linear probe"),
    "export": ("dreamlip.cli.export", "write a checkpoint as an open_clip local-dir model (config + safetensors)"),
    "demo": ("dreamlip.cli.demo", "the main job: data, CLIP vs DreamLIP training, evaluation, HTML report"),
    "prepare": ("dreamlip.cli.prepare", "join a caption file to img2dataset's images and write training shards"),
    "recaption": ("dreamlip.cli.recaption", "add long and short captions from a multimodal LLM"),
    "convert": ("dreamlip.cli.convert", "long-text benchmarks (DCI, Urban1k, ShareGPT4V, DOCCI, IIW) to the retrieval format"),
    "serve": ("dreamlip.cli.serve", "a local web page and JSON API to search an image collection and see heatmaps"),
}


def _build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamlip", description="DreamLIP: language-image pre-training with long captions.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _build_parser(argv).parse_args(argv)
    module_name, _ = SUBCOMMANDS[args.command]
    try:
        return int(importlib.import_module(module_name).run(args) or 0)
    except (ValueError, OSError) as err:
        # Bad input, config or files: say what is wrong, not where in the stack it surfaced.
        if os.environ.get("DREAMLIP_TRACEBACK"):
            raise
        print(f"dreamlip {args.command}: error: {err}", file=sys.stderr)
        return 2
