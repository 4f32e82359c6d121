"""Process-group set-up (nccl on GPU, gloo on CPU) for processes started by torchrun, Slurm's
``srun`` or an MPI launcher, and the parallel strategy.

Collectives wait at most ``timeout`` seconds (``run.dist_timeout``) for the other ranks, and a
:class:`RankMonitor` watches every rank's heartbeat: it logs the run's progress, warns as soon as
a rank falls silent, and turns the timeout into a :class:`CollectiveTimeout` naming that rank.

A :class:`Strategy` (one process, :class:`DDPStrategy`, or :class:`FSDPStrategy` for towers too
big to replicate) owns everything that depends on how the model is spread over ranks: wrapping
it, the gradient sync of accumulated micro-batches, the gradients it leaves to be averaged, full
state dicts of model and optimizer, and reductions over ranks. This is the only module that knows
which one runs; the trainer calls the same methods under all three.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dreamlip.launch import launch_from_env

if TYPE_CHECKING:
    from dreamlip.train import TrainModule

__all__ = [
    "CollectiveTimeout",
    "DDPStrategy",
    "DistEnv",
    "FSDPStrategy",
    "RankMonitor",
    "Strategy",
    "init_distributed",
    "make_strategy",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout: float | None = None) -> DistEnv:
    """Read the launcher's environment (:func:`launch_from_env`); start the process group when
    there is more than one process.

    ``device="auto"`` takes ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. ``timeout``:
    seconds a collective waits for the other ranks before it fails (None: torch's default).
    """
    launch = launch_from_env()
    if device == "auto":
        device = f"cuda:{launch.local_rank}" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if launch.world_size > 1 and not dist.is_initialized():
        if launch.launcher != "torchrun":  # env:// reads them; torchrun has set its own
            if launch.master_addr is None:
                raise ValueError(
                    f"started by {launch.launcher} as rank {launch.rank} of {launch.world_size} on several hosts, "
                    f"and MASTER_ADDR is not set: export MASTER_ADDR=<rank 0's host> (and MASTER_PORT, default "
                    f"{launch.master_port}) for every rank"
                )
            os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = launch.master_addr, str(launch.master_port)
        dist.init_process_group(
            backend="nccl" if resolved.type == "cuda" else "gloo",
            init_method="env://",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=timeout) if timeout is not None else None,
        )
    return DistEnv(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=resolved)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_spawned_rank() -> NoReturn:
    """End a spawned rank whose work is done and written, without finalizing the interpreter.

    DDP's reducer keeps the gloo group and its worker threads alive past ``destroy_process_group``;
    a worker thread that drops a tensor's Python object while the interpreter finalizes cannot take
    the GIL and aborts the rank ("terminate called without an active exception", rarely), which
    its parent reports as a failed rank.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class CollectiveTimeout(TimeoutError):
    """A collective failed while some rank had stopped answering: the message names that rank."""


class RankMonitor:
    """Every rank's heartbeat, through the process group's store.

    A thread on each rank publishes a counter and the rank's step every ``period`` seconds. It
    runs while the main thread waits in a collective, so a rank whose counter stops is frozen
    (stopped, swapping, stuck holding the interpreter) or dead, not merely waiting for the others.
    The main rank logs a heartbeat line every ``log_every`` seconds (0: never) and a warning as
    soon as a rank has been silent for ``silent_after`` seconds; :meth:`explain` turns the error a
    collective raises when its timeout passes into a :class:`CollectiveTimeout` naming the rank.
    """

    _KEY = "dreamlip/heartbeat/{}"

    def __init__(self, env: DistEnv, *, timeout: float, log_every: float, log: Callable[[str], None]):
        from torch.distributed.distributed_c10d import _get_default_store

        self.env, self.timeout, self.log_every, self.log = env, timeout, log_every, log
        self.period = min(5.0, timeout / 10)  # several beats per timeout, however short it is set
        self.silent_after = 3 * self.period
        self.step = 0  # the loop's progress, set by the trainer
        self._store = _get_default_store()
        self._keys = [self._KEY.format(rank) for rank in range(env.world_size)]
        self._beats = 0
        self._seen: dict[int, tuple[bytes, float]] = {}  # rank -> (its last beat, when it changed)
        self._warned: set[int] = set()
        self._lock = threading.Lock()  # the heartbeat thread and explain() both read the beats
        self._stop = threading.Event()
        self._beat()
        self._store.wait(self._keys)  # every rank has beaten once: the watch starts from there
        self._thread = threading.Thread(target=self._run, name="rank-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._beats += 1
        self._store.set(self._KEY.format(self.env.rank), f"{self._beats} {self.step}")

    def _run(self) -> None:
        last_log = time.monotonic()
        while not self._stop.wait(self.period):
            self._beat()
            silent = self.silent_ranks()  # every rank keeps track, to explain its own timeout
            if not self.env.is_main:
                continue
            for rank, seconds, step in silent:
                if rank not in self._warned:
                    self.log(f"rank {rank} has been silent for {seconds:.1f} s (last heard at step {step}); "
                             f"collectives fail after run.dist_timeout={self.timeout:g} s")
            self._warned = {rank for rank, _, _ in silent}
            if self.log_every and time.monotonic() - last_log >= self.log_every:
                last_log = time.monotonic()
                quiet = ", ".join(f"rank {r} silent {s:.0f} s" for r, s, _ in silent) or "every rank beating"
                self.log(f"heartbeat: step {self.step}, {self.env.world_size} ranks, {quiet}")

    def silent_ranks(self) -> list[tuple[int, float, int]]:
        """``(rank, seconds since its beat last changed, its step then)`` of each rank silent for
        over ``silent_after`` seconds, read from the store now."""
        with self._lock:
            beats = self._store.multi_get(self._keys)
            now = time.monotonic()
            silent = []
            for rank, beat in enumerate(beats):
                if rank not in self._seen or self._seen[rank][0] != beat:
                    self._seen[rank] = (beat, now)
                since = now - self._seen[rank][1]
                if since > self.silent_after:
                    silent.append((rank, since, int(beat.split()[1])))
            return silent

    def explain(self, err: BaseException) -> None:
        """Raise :class:`CollectiveTimeout` from ``err`` (a collective's failure) when some other
        rank is silent; return otherwise (the error is something else)."""
        if not isinstance(err, RuntimeError):
            return
        try:
            silent = [entry for entry in self.silent_ranks() if entry[0] != self.env.rank]
        except Exception:  # noqa: BLE001 - the store itself is gone: nothing to add
            return
        if not silent:
            return
        named = "; ".join(f"rank {rank} silent for {seconds:.1f} s, last heard at step {step}" for rank, seconds, step in silent)
        raise CollectiveTimeout(
            f"rank {self.env.rank} stopped at step {self.step}: a collective failed while other ranks were not answering "
            f"({named}). A stopped, swapping or hung process does this; raise run.dist_timeout (now {self.timeout:g} s) "
            "if a step can legitimately take longer"
        ) from err

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def make_strategy(name: str, env: DistEnv) -> Strategy:
    """The strategy ``run.strategy`` names; in a single process there is nothing to spread."""
    if not env.is_distributed:
        return Strategy(env)
    strategies = {"ddp": DDPStrategy, "fsdp": FSDPStrategy}
    if name not in strategies:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(strategies)}")
    return strategies[name](env)


class Strategy:
    """One process: the model is used as it is. The base of the data-parallel strategies.

    After :meth:`wrap`, ``model`` is the trainer's module (the model and the objective: their
    parameters and state dict) and ``net`` the module to call for a training forward: DDP's wrapper,
    whose hooks all-reduce the gradients during backward, or the module itself (one process;
    FSDP2, which shards in place).
    """

    sharded = False  # whether each rank holds only part of the weights (no forward on one rank alone)

    def __init__(self, env: DistEnv):
        self.env = env
        self.model: nn.Module | None = None
        self.net: nn.Module | None = None

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def wrap(self, module: TrainModule, compile: bool = False) -> None:
        """Take the model and objective (their weights already loaded). Build the optimizer after
        this: FSDP2 replaces the parameters by their shards.

        ``compile``: ``net`` becomes ``torch.compile`` of the wrapped module (of DDP's wrapper, so
        its graphs split at the gradient buckets and the all-reduces still overlap the backward).
        ``model`` stays the plain module, so state dicts keep their names (no ``_orig_mod.``) and
        checkpoints load into an eager run."""
        self._wrap(module)
        if compile:
            self.net = torch.compile(self.net)

    def _wrap(self, module: TrainModule) -> None:
        self.model = self.net = module

    def describe(self) -> str:
        """How the model is spread over ranks, for the run's log."""
        return "one process"

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Around a backward pass: skip the gradient all-reduce / reduce-scatter when not
        ``enabled`` (the first micro-batches of an accumulated step)."""
        return contextlib.nullcontext()

    def reduce_replicated_grads(self) -> None:
        """After the last backward of a step: average the gradients the wrapper leaves alone."""

    def clip_grad_norm_(self, max_norm: float) -> None:
        """Scale the gradients so that their global norm is at most ``max_norm``."""
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, as a plain module's ``state_dict`` names them
        (every rank must call it; under FSDP2 only the main rank gets them)."""
        return {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state keyed by parameter name, whole (gathered from the shards under
        FSDP2, on the main rank), so a run can resume on another number of ranks or strategy."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer, options=_full_options())

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load what :meth:`optimizer_state_dict` saved (every rank passes the whole state)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    # Reductions over ranks: every rank must call them at the same point.

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over ranks."""
        if not self.env.is_distributed:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.env.world_size

    def gather_lists(self, values: list[int]) -> list[list[int]]:
        """Every rank's list, in rank order."""
        if not self.env.is_distributed:
            return [list(values)]
        gathered: list[list[int]] = [[] for _ in range(self.env.world_size)]
        dist.all_gather_object(gathered, list(values))
        return gathered

    def reduce_counts(self, counts: Counter) -> dict[str, int]:
        """Counts (skipped samples by reason) summed over ranks."""
        if not self.env.is_distributed:
            return dict(counts)
        gathered: list[dict[str, int]] = [{} for _ in range(self.env.world_size)]
        dist.all_gather_object(gathered, dict(counts))
        return dict(sum((Counter(c) for c in gathered), Counter()))


class DDPStrategy(Strategy):
    """Every rank holds the whole model; DDP averages the gradients during backward."""

    def _wrap(self, module: TrainModule) -> None:
        self.model = module
        self.net = DistributedDataParallel(module, device_ids=[self.env.device.index] if self.env.device.type == "cuda" else None)

    def describe(self) -> str:
        return "DDP (replicated model)"

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if enabled else self.net.no_sync()


class FSDPStrategy(Strategy):
    """FSDP2 (``fully_shard``): every transformer block of both towers is sharded, then the rest of
    the model at the root; parameters, gradients and optimizer state live 1/world_size per rank. It
    cannot shard 0-d parameters (the temperatures), and the objective's parameters run outside the
    model's forward, so those stay replicated and :meth:`reduce_replicated_grads` averages their
    gradients as DDP would."""

    sharded = True

    def _wrap(self, module: TrainModule) -> None:
        from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock
        from torch.distributed.fsdp import fully_shard

        # The text tower runs once per length bucket (DreamLIPModel.encode_text): its blocks stay
        # gathered from the first bucket to the backward pass instead of being re-gathered per bucket.
        text_tower = getattr(module.model.clip, "transformer", None)  # open_clip's CLIP; CustomTextCLIP has none
        text_blocks = set(text_tower.modules()) if text_tower is not None else set()
        for block in module.model.modules():
            if isinstance(block, (ResidualAttentionBlock, CustomResidualAttentionBlock)):
                fully_shard(block, reshard_after_forward=block not in text_blocks)
        self.replicated = [p for p in module.parameters() if p.ndim == 0] + [
            p for p in module.objective.parameters() if p.ndim > 0
        ]
        fully_shard(module, ignored_params=set(self.replicated))
        self.model = self.net = module

    def describe(self) -> str:
        from torch.distributed.fsdp import FSDPModule

        shards = sum(isinstance(module, FSDPModule) for module in self.model.modules())
        return f"FSDP2 ({shards} sharded modules: the transformer blocks and the root)"

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def reduce_replicated_grads(self) -> None:
        for param in self.replicated:
            if param.grad is not None:
                dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)

    def clip_grad_norm_(self, max_norm: float) -> None:
        """The norm over the shards (a collective) and over the replicated gradients (the same on
        every rank once averaged), combined: one norm op cannot take both kinds of tensor."""
        from torch.distributed.tensor import DTensor

        replicated = set(self.replicated)
        params: dict[bool, list[nn.Parameter]] = {True: [], False: []}
        for param in self.model.parameters():
            if param.grad is not None:
                params[param in replicated].append(param)
        norms = [torch.nn.utils.get_total_norm([p.grad for p in part]) for part in params.values() if part]
        norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
        total = torch.linalg.vector_norm(torch.stack(norms))
        for part in params.values():
            torch.nn.utils.clip_grads_with_norm_(part, max_norm, total)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=_full_options())


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)
