"""The launcher's environment read as rank, world and rendezvous: torchrun, srun, Open MPI, MPICH;
and two plain processes started with only srun's variables form one gloo world."""

import os
import socket
import subprocess
import sys

import pytest

from dreamlip.launch import Launch, first_host, launch_from_env

SRUN_TASK_1_OF_8 = {  # what srun sets for the second task of `srun --nodes=2 --ntasks-per-node=4`
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node01", "node01"),
        ("node[01-04]", "node01"),
        ("node[007,009-012]", "node007"),
        ("gpu[3-4],cpu[1-2]", "gpu3"),
        ("login,gpu[1-2]", "login"),
        ("rack1-[2-3]-n[08-09]", "rack1-2-n08"),
        ("node-a.cluster,node-b.cluster", "node-a.cluster"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01-04", "[]"])
def test_an_unreadable_nodelist_names_what_to_export(nodelist):
    with pytest.raises(ValueError, match="export MASTER_ADDR="):
        first_host(nodelist)


def test_srun_task():
    assert launch_from_env(SRUN_TASK_1_OF_8) == Launch("slurm", 1, 8, 1, "gpu07", 10000 + 4242)


def test_srun_task_takes_master_addr_and_port_when_set():
    launch = launch_from_env({**SRUN_TASK_1_OF_8, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.5", 1234)


def test_the_step_nodelist_wins_over_the_jobs():
    # A step on part of the allocation: rank 0 runs on the step's first node.
    launch = launch_from_env({**SRUN_TASK_1_OF_8, "SLURM_STEP_NODELIST": "gpu08", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert launch.master_addr == "gpu08"


def test_torchrun_wins_over_srun():
    # `srun torchrun ...`: torchrun's numbering is the world; its agent has set the rendezvous.
    env = {**SRUN_TASK_1_OF_8, "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5"}
    assert launch_from_env(env) == Launch("torchrun", 5, 16, 5)


def test_a_batch_script_without_srun_is_one_process():
    # The batch step has SLURM_NTASKS and SLURM_PROCID too; a plain `python` there is alone.
    batch = {key: value for key, value in SRUN_TASK_1_OF_8.items() if not key.startswith("SLURM_STEP")}
    assert launch_from_env(batch) == Launch("none", 0, 1, 0)
    assert launch_from_env({}) == Launch("none", 0, 1, 0)


def test_open_mpi_on_one_host_and_on_several():
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert launch_from_env(env) == Launch("openmpi", 3, 4, 3, "127.0.0.1", 29500)
    several = {**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert launch_from_env(several) == Launch("openmpi", 3, 4, 1, None, 29500)


def test_mpich_pmi():
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1", "MASTER_ADDR": "head"}
    assert launch_from_env(env) == Launch("mpich", 1, 2, 0, "head", 29500)


def test_a_non_integer_variable_is_named():
    with pytest.raises(ValueError, match=r"SLURM_PROCID='one' is not an integer"):
        launch_from_env({**SRUN_TASK_1_OF_8, "SLURM_PROCID": "one"})


def test_several_mpi_hosts_without_master_addr_stop_with_what_to_export(monkeypatch):
    from dreamlip.distributed import init_distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2")
    with pytest.raises(ValueError, match=r"^started by openmpi as rank 1 of 4 on several hosts.*export MASTER_ADDR="):
        init_distributed("cpu")


def test_recaption_shards_by_the_srun_task(monkeypatch):
    from dreamlip.cli.recaption import _parse_shard

    for name in ("WORLD_SIZE", "RANK", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SRUN_TASK_1_OF_8.items():
        monkeypatch.setenv(name, value)
    assert _parse_shard("auto") == (1, 8)


_RANK_PROGRAM = """
import torch, torch.distributed as dist
from dreamlip.distributed import init_distributed, shutdown_distributed
env = init_distributed("cpu", timeout=60)
total = torch.tensor([env.rank + 1.0])
dist.all_reduce(total)
print(env.rank, env.world_size, env.local_rank, dist.get_world_size(), int(total.item()))
shutdown_distributed()
"""


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.distributed
def test_two_srun_tasks_form_one_gloo_world():
    """Two plain `python` processes with only the variables srun sets (no torchrun, no MASTER_*):
    rank 0's address comes from the node list, its port from the job id."""
    job = next(job for job in range(1000, 20000, 37) if _port_is_free(10000 + job))
    launchers = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in launchers and not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    srun = {"SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "localhost", "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen([sys.executable, "-c", _RANK_PROGRAM], env={**base, **srun, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=120) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert [process.returncode for process in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    # rank, world, local rank, the process group's size, and the all-reduced 1 + 2
    assert [out.split() for out, _ in outputs] == [["0", "2", "0", "2", "3"], ["1", "2", "1", "2", "3"]]
