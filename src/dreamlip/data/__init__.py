"""Datasets: record readers (JSONL, the authors' CSV, webdataset shards) and the embedded synthetic set."""
