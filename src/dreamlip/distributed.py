"""Process-group set-up for torchrun (nccl on GPU, gloo on CPU), the data-parallel wrapping of the
model (DDP, or FSDP2 for towers too big to replicate) and small collective helpers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistEnv",
    "all_reduce_mean",
    "describe_parallel",
    "full_state_dict",
    "gradient_sync",
    "init_distributed",
    "load_optimizer_state",
    "optimizer_state",
    "reduce_replicated_grads",
    "shutdown_distributed",
    "wrap_model",
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


def init_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's environment; start the process group when there is more than one process.

    ``device="auto"`` takes ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def _sharded_block_types() -> tuple[type, ...]:
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    return ResidualAttentionBlock, CustomResidualAttentionBlock


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(model: nn.Module, env: DistEnv, strategy: Literal["ddp", "fsdp"] = "ddp") -> nn.Module:
    """The module to train with: the model itself in one process, else DDP or FSDP2.

    FSDP2 (``fully_shard``) shards every transformer block of both towers, then the rest at the
    root; parameters, gradients and optimizer state live 1/world_size per rank. It cannot shard
    0-d parameters (the temperatures), so those stay replicated and
    :func:`reduce_replicated_grads` averages their gradients as DDP would.
    """
    if not env.is_distributed:
        return model
    if strategy == "ddp":
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    if strategy != "fsdp":
        raise ValueError(f"unknown strategy {strategy!r}; expected 'ddp' or 'fsdp'")
    from torch.distributed.fsdp import fully_shard

    # The text tower runs once per length bucket (DreamLIPModel.encode_text): its blocks stay
    # gathered from the first bucket to the backward pass instead of being re-gathered per bucket.
    text_tower = getattr(getattr(model, "clip", None), "transformer", None)
    text_blocks = set(text_tower.modules()) if text_tower is not None else set()
    for module in model.modules():
        if isinstance(module, _sharded_block_types()):
            fully_shard(module, reshard_after_forward=module not in text_blocks)
    fully_shard(model, ignored_params={p for p in model.parameters() if p.ndim == 0})
    return model


def describe_parallel(net: nn.Module) -> str:
    """How the model is spread over ranks, for the run's log."""
    if isinstance(net, DistributedDataParallel):
        return "DDP (replicated model)"
    if not _is_fsdp(net):
        return "one process"
    from torch.distributed.fsdp import FSDPModule

    shards = sum(isinstance(module, FSDPModule) for module in net.modules())
    return f"FSDP2 ({shards} sharded modules: the transformer blocks and the root)"


def reduce_replicated_grads(model: nn.Module) -> None:
    """Average over ranks the gradients FSDP2 leaves alone (its ignored 0-d parameters)."""
    if not (_is_fsdp(model) and dist.is_initialized()):
        return
    for param in model.parameters():
        if param.ndim == 0 and param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)


@contextlib.contextmanager
def gradient_sync(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter of a backward pass when not ``enabled``
    (the first micro-batches of an accumulated step)."""
    if isinstance(net, DistributedDataParallel) and not enabled:
        with net.no_sync():
            yield
    elif _is_fsdp(net):
        net.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, as a plain module's ``state_dict`` names them.

    Under FSDP2 this gathers the shards (every rank must call it) and only rank 0 gets them.
    """
    if not _is_fsdp(model):
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, whole (gathered from the shards under FSDP2,
    on rank 0), so a run can resume on another number of ranks or another strategy."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what :func:`optimizer_state` saved (every rank passes the whole state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
