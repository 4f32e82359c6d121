"""Readers shared by the tests of the demo-data kinds (test_synthetic.py, test_realset.py): the
written files, every training text a model could see, and every held-out test query."""

from __future__ import annotations

import json
from pathlib import Path

from dreamlip.captions import split_sentences


def read_split(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def training_texts(train: list[dict]) -> list[str]:
    """Raw captions, short captions, long captions whole and split into sentences."""
    texts = []
    for r in train:
        texts.append(r["raw_caption"])
        for c in r["captions"].values():
            texts += [c["short"], c["long"], *split_sentences(c["long"])]
    return texts


def test_queries(root: Path, test: list[dict]) -> list[str]:
    """The retrieval texts and every zero-shot classification and segmentation prompt."""
    classes = json.loads((root / "classes.json").read_text())
    queries = [t for r in test for t in r["texts"]]
    for task in ("classification", "segmentation"):
        names = [n for n in classes[task]["names"] if n != "background"]
        queries += [tpl.format(n) for tpl in classes[task]["templates"] for n in names]
    return queries


test_queries.__test__ = False  # a helper, not a test
