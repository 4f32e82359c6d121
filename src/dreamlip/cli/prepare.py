"""``dreamlip prepare``: see :mod:`dreamlip.prepare` and docs/prepare.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from dreamlip.prepare import FLAGS, PrepareConfig, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="img2dataset's output folder (--output_format webdataset)")
    parser.add_argument("--out", required=True, help="folder for the training shards, sizes.json and report.json")
    parser.add_argument(
        "--captions",
        help="caption file to join by image URL (CSV/TSV/parquet/JSONL in any layout docs/data.md reads, "
        "e.g. the authors' cc3m_3long_3short_1raw_captions_url.csv); default: the captions in the shards",
    )
    parser.add_argument("--shard-size", type=int, default=10_000, help="samples per output shard (default 10000)")
    parser.add_argument("--workers", type=int, default=1, help="processes, one img2dataset tar each at a time")
    parser.add_argument("--drop", default="", help=f"drop captions with these flags (comma-separated: {', '.join(FLAGS)})")
    parser.add_argument("--token-sample", type=float, default=0.01,
                        help="share of sentences measured in CLIP tokens for the report (default 0.01)")
    parser.add_argument("--work-dir", help="work folder (default OUT/.prepare-work); resume with the same settings")


def _line(name: str, stats: dict | None) -> str:
    if not stats:
        return f"  {name}: none"
    return f"  {name}: p5 {stats['p5']}, median {stats['p50']}, p95 {stats['p95']}, max {stats['max']} (n={stats['count']})"


def run(args: argparse.Namespace) -> int:
    config = PrepareConfig(
        images=Path(args.images),
        out=Path(args.out),
        captions=Path(args.captions) if args.captions else None,
        shard_size=args.shard_size,
        workers=args.workers,
        drop=tuple(f for f in args.drop.split(",") if f),
        token_sample=args.token_sample,
        work_dir=Path(args.work_dir) if args.work_dir else None,
    )
    report = prepare(config)
    failed = sum(report["images_failed"].values())
    print(f"rows {report['rows']}: images found {report['images_found']}, missing {report['images_missing']}, "
          f"failed {failed} {report['images_failed'] or ''}".rstrip())
    print(f"written {report['written']} samples in {report['shards']} shards to {args.out}; "
          f"skipped {report['skipped'] or 'none'}; downloaded but not in the captions {report['downloaded_not_in_captions']}")
    print("captions per captioner: " + (", ".join(f"{k} {v}" for k, v in report["captions"].items()) or "none"))
    print("lengths:")
    print(_line("sentences per long caption", report["sentences_per_long_caption"]))
    print(_line("words per sentence", report["words_per_sentence"]))
    print(_line("CLIP tokens per sentence (sampled)", report["clip_tokens_per_sentence"]))
    dropped = ", ".join(report["dropped_flags"]) or "none"
    print(f"quality flags (dropped: {dropped}): " + (", ".join(f"{k} {v}" for k, v in report["flags"].items()) or "none"))
    speed = f"{report['rows_per_second']} rows/s" if report["rows_per_second"] else "nothing left to do"
    print(f"{speed} with {report['workers']} worker(s), {report['seconds']} s in all")
    return 0
