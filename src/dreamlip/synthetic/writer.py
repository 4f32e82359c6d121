"""Writing a generated demo dataset to disk, for every kind ``dreamlip demo-data`` renders.

A kind supplies ``render(split, index) -> (record, rgb, mask)``, the ``classes.json`` contents and
the ``meta.json`` contents (with at least ``n_train``, ``n_test`` and ``image_size``); this module
writes the images, masks, JSONL splits and both JSON files. Image ``index`` of a split must depend
only on the kind's arguments, ``split`` and ``index``, so the output is byte-identical whatever the
number of worker processes.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from dreamlip.formats import DEMO_CLASSES, DEMO_IMAGES, DEMO_MASKS, DEMO_META, DEMO_SPLITS, demo_split_file
from dreamlip.io import atomic_write, file_lock

__all__ = ["IGNORE_INDEX", "SPLITS", "classes_spec", "dataset_generator", "write_dataset"]

SPLITS = {split: i for i, split in enumerate(DEMO_SPLITS)}  # split -> its seed stream
IGNORE_INDEX = 255
Render = Callable[[str, int], tuple[dict[str, Any], np.ndarray, np.ndarray]]


def classes_spec(names: list[str], templates: list[str], *, kind: str, attributes: dict[str, list]) -> dict[str, Any]:
    """Contents of ``classes.json`` for a set whose label is the ``kind`` (e.g. "shape") of the
    largest visible object, whose masks hold ``names`` index + 1 (0 background), and whose test
    records carry retrieval ``texts``."""
    return {
        "classification": {
            "names": list(names),
            "templates": list(templates),
            "label": f"{kind} of the object with the largest visible area in the image",
        },
        "segmentation": {
            "names": ["background"] + list(names),
            "ignore_index": IGNORE_INDEX,
            "templates": list(templates),
            "mask": f"pixel value = index into names (0 background, k = {kind} names[k])",
        },
        "retrieval": {
            "texts_field": "texts",
            "protocol": "test records only; an image counts as found if any of its texts "
            "ranks in the top k (image-to-text) / each text's image (text-to-image)",
        },
        "attributes": attributes,
    }


def dataset_generator(
    make_record: Callable[..., tuple[dict[str, Any], np.ndarray, np.ndarray]],
    classes: Callable[[], dict[str, Any]],
    meta: Callable[..., dict[str, Any]],
    doc: str,
) -> Callable[..., dict[str, Any]]:
    """A kind's ``generate(out_dir, n_train, n_test, image_size, seed, workers, progress, reuse)``
    from its ``make_record(split, index, seed, image_size)``, ``classes()`` (classes.json) and
    ``meta(seed=, image_size=, n_train=, n_test=)`` (meta.json), documented by ``doc``."""

    def generate(
        out_dir: str | os.PathLike,
        n_train: int = 5000,
        n_test: int = 1000,
        image_size: int = 64,
        seed: int = 0,
        workers: int = 1,
        progress: bool = False,
        reuse: bool = False,
    ) -> dict[str, Any]:
        return write_dataset(
            out_dir,
            render=functools.partial(make_record, seed=seed, image_size=image_size),
            classes=classes(),
            meta=meta(seed=seed, image_size=image_size, n_train=n_train, n_test=n_test),
            workers=workers,
            progress=progress,
            reuse=reuse,
        )

    generate.__doc__ = doc
    return generate


def write_dataset(
    out_dir: str | os.PathLike,
    *,
    render: Render,
    classes: dict[str, Any],
    meta: dict[str, Any],
    workers: int = 1,
    progress: bool = False,
    reuse: bool = False,
) -> dict[str, Any]:
    """Write the dataset to ``out_dir`` and return a summary dict.

    ``workers > 1`` renders in that many processes (``render`` must pickle: a module-level
    function or a ``functools.partial`` of one). With ``reuse``, a complete set already there with
    the same ``meta.json`` is left untouched (summary ``"reused": True``), so processes reading it
    are never handed a half-rewritten file. Writers take turns on a lock file in ``out_dir``;
    ``meta.json`` is removed first and written last, so it marks a complete set.
    """
    if meta["image_size"] < 32:
        raise ValueError(f"image_size must be >= 32, got {meta['image_size']}")
    if meta["n_train"] < 0 or meta["n_test"] < 0:
        raise ValueError("n_train and n_test must be >= 0")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / ".generate.lock"):
        if reuse and _is_complete(root, meta):
            return _summary(root, meta, seconds=0.0, reused=True)
        (root / DEMO_META).unlink(missing_ok=True)
        start = time.perf_counter()
        _write(root, render, classes, n_train=meta["n_train"], n_test=meta["n_test"], workers=workers, progress=progress)
        atomic_write(root / DEMO_META, lambda f: f.write(json.dumps(meta, indent=2) + "\n"))
        return _summary(root, meta, seconds=time.perf_counter() - start, reused=False)


def _is_complete(root: Path, meta: dict[str, Any]) -> bool:
    try:
        if json.loads((root / DEMO_META).read_text(encoding="utf-8")) != json.loads(json.dumps(meta)):
            return False
        for split in SPLITS:
            with open(demo_split_file(root, split), encoding="utf-8") as f:
                if sum(1 for _ in f) != meta[f"n_{split}"]:
                    return False
    except (OSError, ValueError):  # missing or unreadable: write it afresh
        return False
    return True


def _summary(root: Path, meta: dict[str, Any], *, seconds: float, reused: bool) -> dict[str, Any]:
    n_images = meta["n_train"] + meta["n_test"]
    return {
        "out_dir": str(root),
        "n_train": meta["n_train"],
        "n_test": meta["n_test"],
        "image_size": meta["image_size"],
        "seed": meta["seed"],
        "seconds": seconds,
        "images_per_s": n_images / seconds if seconds > 0 else float("inf"),
        "reused": reused,
        "files": [*(demo_split_file("", s).name for s in SPLITS), DEMO_CLASSES, DEMO_META, f"{DEMO_IMAGES}/", f"{DEMO_MASKS}/"],
    }


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _work(job: tuple[Render, str, int, str]) -> str:
    render, split, index, out_dir = job
    record, img, seg = render(split, index)
    root = Path(out_dir)
    _save_png(img, root / record["image"])
    _save_png(seg, root / record["mask"])
    return json.dumps(record, ensure_ascii=False)


def _write(
    root: Path, render: Render, classes: dict[str, Any], *, n_train: int, n_test: int, workers: int, progress: bool
) -> None:
    for split in SPLITS:
        (root / DEMO_IMAGES / split).mkdir(parents=True, exist_ok=True)
        (root / DEMO_MASKS / split).mkdir(parents=True, exist_ok=True)
    jobs = [(render, s, i, str(root)) for s, n in (("train", n_train), ("test", n_test)) for i in range(n)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), unit="img", desc="demo-data")
    lines: dict[str, list[str]] = {"train": [], "test": []}
    pool = None
    try:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers)
            results = pool.imap(_work, jobs, chunksize=32)
        else:
            results = map(_work, jobs)
        for (_, split, *_), line in zip(jobs, results):
            lines[split].append(line)
            if bar is not None:
                bar.update()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    for split, split_lines in lines.items():
        with open(demo_split_file(root, split), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(line + "\n" for line in split_lines)
    with open(root / DEMO_CLASSES, "w", encoding="utf-8") as f:
        json.dump(classes, f, indent=2)
        f.write("\n")
