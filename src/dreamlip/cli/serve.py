"""``dreamlip serve``: see :mod:`dreamlip.serve.app`."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import sys

import numpy as np

from dreamlip.serve.app import DEFAULT_UPLOAD_MB, create_app, model_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a dreamlip checkpoint, or a directory from dreamlip export")
    parser.add_argument("--compare", help="a second model, shown beside the first")
    parser.add_argument(
        "--images",
        required=True,
        help="the collection: a demo-data directory, a JSONL of records, a retrieval dataset "
        "(Karpathy JSON, {image, caption} JSON/JSONL) or a folder of images",
    )
    parser.add_argument("--split", default="test", help="the split of a demo-data directory or Karpathy JSON (default test)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch when embedding the collection")
    parser.add_argument("--workers", type=int, default=2, help="image decoding processes when embedding (default 2)")
    parser.add_argument("--index", choices=("auto", "faiss", "exact"), default="auto", help="search index (default: faiss when installed)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_UPLOAD_MB, help="largest request body (default 16)")
    parser.add_argument("--seg-short-side", type=int, help="segmentation: resize images to this short side first (default: their own)")


def _embed(served, collection, args: argparse.Namespace) -> np.ndarray:
    from dreamlip.eval.encode import encode_images

    from dreamlip.serve.index import cache_key, cached_embeddings

    ctx = dataclasses.replace(served.ctx, batch_size=args.batch_size, workers=args.workers, progress=True)
    sources = [entry.image for entry in collection.items]
    key = cache_key(served.path, collection, served.image_size)
    return cached_embeddings(served.path, collection, key, lambda: encode_images(ctx, sources, f"embedding ({served.name})").numpy())


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from dreamlip.serve.index import build_index, read_collection
    from dreamlip.serve.readouts import load_served_model

    collection = read_collection(args.images, split=args.split)
    paths = [args.checkpoint] + ([args.compare] if args.compare else [])
    models, indexes = [], []
    for path, name in zip(paths, model_names(paths)):
        served = load_served_model(path, name, args.device)
        models.append(served)
        indexes.append(build_index(_embed(served, collection, args), args.index))
    options = {"short_side": args.seg_short_side} if args.seg_short_side else {}
    app = create_app(models, collection, indexes, max_upload_bytes=int(args.max_upload_mb * 2**20), segment_options=options)
    if not _is_loopback(args.host):
        print(f"dreamlip serve: warning: bound to {args.host}: anyone who can reach it can use it (no login)", file=sys.stderr)
    print(
        f"dreamlip serve: {len(collection)} images, {len(models)} model(s), {indexes[0].kind} index: "
        f"http://{args.host}:{args.port}/",
        flush=True,
    )
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
