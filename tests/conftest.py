"""Fixtures and names shared by the test modules.

The tiny architectures ship in ``src/dreamlip/model_configs``: Nano (2 blocks, width 64, 32 px)
is the default for anything that trains or encodes; Tiny (64 px) where a second, differently
shaped architecture is needed.
"""

from __future__ import annotations

import argparse
import importlib

import pytest
import torch

from dreamlip.cli import SUBCOMMANDS

NANO = "DreamLIP-ViT-Nano-32"
TINY = "DreamLIP-ViT-Tiny-64"


def run_cli(command: str, *argv) -> int:
    """``dreamlip COMMAND ARGV`` in this process: the subcommand's own exit code, and its exceptions
    raised (``dreamlip.cli.main`` turns ValueError/OSError into exit code 2; tests use ``main`` for that)."""
    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"dreamlip {command}")
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread: the suite runs on small shared machines, and no result depends on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny models' tokenizer (open_clip's CLIP BPE, context 77)."""
    from dreamlip.model import get_tokenizer

    return get_tokenizer(NANO)
