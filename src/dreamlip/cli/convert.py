"""``dreamlip convert``: see :mod:`dreamlip.convert`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dreamlip.convert import write_items
from dreamlip.convert.benchmarks import CONVERTERS, DCI_SPLITS, DOCCI_SPLITS, IIW_SUBSETS, SHAREGPT4V_SPLITS, ConvertError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sets = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)

    def add(name: str, src_help: str) -> argparse.ArgumentParser:
        sub = sets.add_parser(name, help=(CONVERTERS[name].__doc__ or "").split(":")[0])
        sub.add_argument("src", type=Path, help=src_help)
        sub.add_argument("out", type=Path, help="output .json (or .jsonl) of {image, caption}")
        return sub

    add("urban1k", "the Urban1k folder (image/, caption/)")
    sub = add("sharegpt4v", "share-captioner_coco_lcs_sam_1246k_1107.json (or LoTLIP's share4v_sam_10k.json)")
    sub.add_argument("--split", choices=list(SHAREGPT4V_SPLITS), default="1k", help="first 1000 or 10000 entries")
    sub.add_argument("--images", type=Path, help="root of the entries' image paths (default: the JSON's folder)")
    sub = add("dci", "densely_captioned_images/ (or its parent)")
    sub.add_argument("--caption", choices=("full", "summary"), default="full",
                     help="short + extra caption (LoTLIP's, default) or DCI's CLIP-length summary")
    sub.add_argument("--split", choices=DCI_SPLITS, default="all", help="DCI split (default all, as LoTLIP)")
    sub = add("docci", "the DOCCI folder (docci_descriptions.jsonlines, images/)")
    sub.add_argument("--split", choices=DOCCI_SPLITS, default="test")
    sub = add("iiw", "imageinwords' datasets/ folder (IIW-400/, DCI_Test/, DOCCI_Test/)")
    sub.add_argument("--subset", choices=[*IIW_SUBSETS, "all"], default="iiw-400",
                     help="IIW-400 (default), DCI_Test, DOCCI_Test, or all three (LoTLIP's set)")
    sub.add_argument("--aar-images", type=Path, help="DOCCI's images_aar/ (IIW-400)")
    sub.add_argument("--dci-images", type=Path, help="DCI's photos/ (DCI_Test)")
    sub.add_argument("--docci-images", type=Path, help="DOCCI's images/ (DOCCI_Test)")


def run(args: argparse.Namespace) -> int:
    options = {k: v for k, v in vars(args).items() if k not in ("command", "dataset", "src", "out")}
    try:
        items, skipped = CONVERTERS[args.dataset](args.src, **options)
        write_items(items, args.out)
    except ConvertError as err:
        print(f"dreamlip convert {args.dataset}: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "dataset": args.dataset, **options, "n_images": len(items),
                      "skipped": dict(skipped)}, default=str))
    return 0
