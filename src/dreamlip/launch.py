"""Which launcher started this process, and its place in the world: torchrun, Slurm's ``srun``
(one task per GPU), Open MPI or MPICH/Intel MPI. Torch-free, so that ``dreamlip recaption``
(which may run without torch) shards by the same rule as training.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Launch", "first_host", "launch_from_env"]


@dataclass(frozen=True)
class Launch:
    """Where this process stands in the world its launcher started, and where rank 0 listens."""

    launcher: str  # "torchrun", "slurm", "openmpi", "mpich" or "none" (one process)
    rank: int
    world_size: int
    local_rank: int
    # Rank 0's address and port for env:// init (torchrun: None, it sets MASTER_ADDR/PORT itself;
    # an MPI launch over several hosts without MASTER_ADDR: None, which init refuses).
    master_addr: str | None = None
    master_port: int | None = None


_DEFAULT_PORT = 29500  # torchrun's


# launcher -> (rank, world size, local rank, local world size) variables, in order of precedence.
# srun's SLURM_STEP_NUM_TASKS marks a task srun started: the batch script itself also has
# SLURM_NTASKS and SLURM_PROCID=0, and a plain ``python`` there is one process.
_LAUNCHERS = {
    "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", None),
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # and Intel MPI
}


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch:
    """The launch ``environ`` describes: the first launcher of ``_LAUNCHERS`` whose world-size
    variable is set (torchrun's win), else one process. Rank 0's address: MASTER_ADDR when set,
    else the first host of the Slurm step, else 127.0.0.1 when every rank is on this host."""
    launcher = next((name for name, names in _LAUNCHERS.items() if names[1] in environ), None)
    if launcher is None:
        return Launch("none", 0, 1, 0)
    rank_name, world_name, local_name, local_world_name = _LAUNCHERS[launcher]
    rank, world = _int(environ, rank_name, "0"), _int(environ, world_name, "1")
    local = _int(environ, local_name, "0")
    if launcher == "torchrun":
        return Launch(launcher, rank, world, local)
    port = _DEFAULT_PORT
    if launcher == "slurm":
        # Jobs that share a head node must not share a port: spread them by job id.
        job = environ.get("SLURM_JOB_ID", "")
        port = 10000 + int(job) % 20000 if job.isdigit() else _DEFAULT_PORT
    addr = environ.get("MASTER_ADDR")
    if not addr and launcher == "slurm":
        nodes = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        addr = first_host(nodes) if nodes else None
    elif not addr and local_world_name and environ.get(local_world_name) == str(world):
        addr = "127.0.0.1"
    return Launch(launcher, rank, world, local, addr, _int(environ, "MASTER_PORT", str(port)))


def _int(environ: Mapping[str, str], name: str, default: str) -> int:
    value = environ.get(name) or default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list, as ``scontrol show hostnames`` would list it first:
    ``gpu[07-10,12],cpu3`` -> ``gpu07``; ``rack1-[2-3]-n[01-04]`` -> ``rack1-2-n01``."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    # Each bracket group's first value ("07-10,12" -> "07"), zero padding kept.
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1), maxsplit=1)[0], entry)
    if not host or any(c in host for c in "[], "):
        raise ValueError(f"cannot read the first host of the Slurm node list {nodelist!r}: export MASTER_ADDR=<rank 0's host>")
    return host
