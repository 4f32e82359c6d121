"""``dreamlip prepare``'s throughput with 1 and with N worker processes, on the same img2dataset
shards (the authors' caption columns in each sample's JSON, 256 px JPEGs), alternating rounds so
machine noise hits both alike; prints each median rows/s and their ratio.

    python bench/prepare.py                          # 4096 samples in 16 shards, 1 against 2 workers
    python bench/prepare.py --samples 8192 --workers 4 --json prepare.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from loader import write_img2dataset_shards  # the same shards bench/loader.py reads

from dreamlip.prepare import PrepareConfig, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2, help="the worker count compared with one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    shards = write_img2dataset_shards(root / "img2dataset", args.samples)
    rates: dict[int, list[float]] = {1: [], args.workers: []}
    for _ in range(args.rounds):
        for workers in rates:
            out = root / f"out-{workers}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run each round, not a resume
            report = prepare(PrepareConfig(images=root / "img2dataset", out=out, shard_size=1024, workers=workers,
                                           token_sample=0))
            rates[workers].append(report["rows_per_second"])
    medians = {workers: statistics.median(values) for workers, values in rates.items()}
    print(f"{args.samples} samples in {shards} img2dataset shards, {args.rounds} rounds")
    for workers, rate in medians.items():
        print(f"  {workers} worker(s): {rate:8.1f} rows/s")
    ratio = medians[args.workers] / medians[1]
    print(f"{args.workers} workers / 1: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows_per_second": medians, "ratio": ratio}, indent=2))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
