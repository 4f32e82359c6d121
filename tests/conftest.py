"""Fixtures and names shared by the test modules.

The tiny architectures ship in ``src/dreamlip/model_configs``: Nano (2 blocks, width 64, 32 px)
is the default for anything that trains or encodes; Tiny (64 px) where a second, differently
shaped architecture is needed.
"""

from __future__ import annotations

import argparse
import importlib
import socket
import sys

import pytest
import torch

from dreamlip.cli import SUBCOMMANDS

NANO = "DreamLIP-ViT-Nano-32"
TINY = "DreamLIP-ViT-Tiny-64"


def pytest_collection_modifyitems(items):
    # Multi-process tests are slow too, so `-m "not slow"` leaves them out without a second mark.
    for item in items:
        if item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


def cli_command(*argv) -> list[str]:
    """The argv of ``dreamlip ARGV`` in a fresh process (as users and torchrun start it)."""
    return [sys.executable, "-m", "dreamlip.cli", *map(str, argv)]


def torchrun_command(*argv) -> list[str]:
    """``dreamlip ARGV`` started by torchrun on 2 local processes (gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cli_command(*argv)[1:]]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(command: str, *argv) -> int:
    """``dreamlip COMMAND ARGV`` in this process: the subcommand's own exit code, and its exceptions
    raised (``dreamlip.cli.main`` turns ValueError/OSError into exit code 2; tests use ``main`` for that)."""
    module = importlib.import_module(SUBCOMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"dreamlip {command}")
    module.add_arguments(parser)
    return module.run(parser.parse_args([str(a) for a in argv]))


@pytest.fixture
def observe(record_property):
    """``observe(text)``: what the code did under a test's injected fault, in a few words;
    bench/fault_matrix.py prints it beside the fault."""
    return lambda text: record_property("observed", text)


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small embedded dataset (64 train, 8 test images of 32 px) for training runs; read only."""
    from dreamlip.synthetic import generate

    out = tmp_path_factory.mktemp("demo-data")
    generate(out, n_train=64, n_test=8, image_size=32, seed=0)
    return out
