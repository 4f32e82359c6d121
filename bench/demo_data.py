"""Generation speed of a demo dataset (``dreamlip demo-data [--kind real]``).

    python bench/demo_data.py [--kind synthetic|real] [--n 3000] [--image-size 64] [--workers 1]

Renders ``n`` images (90 % train, 10 % test) into a temporary directory and prints images/s.
The project's target: a few thousand 64 px images in under a minute on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import tempfile

from dreamlip.synthetic import DATA_KINDS, generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=DATA_KINDS, default="synthetic")
    parser.add_argument("--n", type=int, default=3000, help="images in total (default 3000)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n_test = max(1, args.n // 10)
    with tempfile.TemporaryDirectory(prefix="dreamlip-demo-bench-") as out:
        s = generator(args.kind)(out, n_train=args.n - n_test, n_test=n_test, image_size=args.image_size,
                                 seed=args.seed, workers=args.workers)
    print(f"{args.n} {args.kind} images of {args.image_size} px, workers={args.workers}: "
          f"{s['seconds']:.1f} s, {s['images_per_s']:.0f} images/s "
          f"({args.n / s['images_per_s'] / 60:.2f} min)")


if __name__ == "__main__":
    main()
