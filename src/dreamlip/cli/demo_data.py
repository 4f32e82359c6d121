"""``dreamlip demo-data``: render the embedded synthetic dataset (:mod:`dreamlip.synthetic`) or the
real-image development set (``--kind real``, :mod:`dreamlip.realset`)."""

from __future__ import annotations

import argparse

from dreamlip.synthetic import DATA_KINDS, generator


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="output directory (created if missing)")
    parser.add_argument("--kind", choices=DATA_KINDS, default="synthetic",
                        help="synthetic: procedural shapes (docs/demo-data.md); real: real photos and scans "
                        "composited (docs/real-data.md); default synthetic")
    parser.add_argument("--n-train", type=int, default=5000, help="training images (default 5000)")
    parser.add_argument("--n-test", type=int, default=1000, help="test images (default 1000)")
    parser.add_argument("--image-size", type=int, default=64, help="side in pixels (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="render in this many processes; output is identical (default 1)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = generator(args.kind)(
        args.out_dir,
        n_train=args.n_train,
        n_test=args.n_test,
        image_size=args.image_size,
        seed=args.seed,
        workers=args.workers,
        progress=not args.quiet,
    )
    print(
        f"wrote {summary['n_train']} train + {summary['n_test']} test {args.kind} images to "
        f"{summary['out_dir']} in {summary['seconds']:.1f} s "
        f"({summary['images_per_s']:.0f} images/s)"
    )
    return 0
