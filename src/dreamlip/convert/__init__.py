"""``dreamlip convert``: long-text benchmarks from their released layouts to the retrieval format.

    dreamlip convert urban1k Urban1k/ urban1k.json
    dreamlip convert sharegpt4v share-captioner_coco_lcs_sam_1246k_1107.json sgv-1k.json --images data/
    dreamlip convert dci dci/ dci.json [--caption full|summary] [--split all|train|valid|test]
    dreamlip convert docci docci/ docci-test.json
    dreamlip convert iiw imageinwords/datasets/ iiw-400.json --aar-images docci/images_aar/
    dreamlip eval --checkpoint CKPT --data urban1k.json --tasks retrieval --long-text full

OUT is a JSON list (or, for ``.jsonl``, one object a line) of ``{"image", "caption"}`` with
absolute image paths, which ``dreamlip eval --tasks retrieval`` reads. Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

from .benchmarks import CONVERTERS, ConvertError

__all__ = ["CONVERTERS", "ConvertError", "write_items"]


def write_items(items: list[dict[str, str]], out: Path) -> None:
    from dreamlip.recaption.sources import atomic_write

    if out.suffix == ".jsonl":
        atomic_write(out, lambda handle: handle.writelines(json.dumps(item) + "\n" for item in items))
    else:
        atomic_write(out, lambda handle: json.dump(items, handle, indent=1))
