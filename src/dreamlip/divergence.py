"""The trainer's guard against divergence: a non-finite loss term or gradient stops the run, or
skips that one update, before the optimizer applies it.

Every rank takes the same decision (the flags are reduced over ranks), so no rank steps while
another skips or stops. The update is never applied, so the weights in memory, and every
checkpoint written from them, stay finite; :func:`dreamlip.checkpoint.save_checkpoint` refuses
non-finite weights as a second line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from dreamlip.distributed import Strategy

__all__ = ["DivergenceGuard", "TrainingDiverged"]


class TrainingDiverged(ValueError):
    """A step's loss or gradients were not finite and the run is configured (or forced) to stop."""


class DivergenceGuard:
    """``allows_update(step, terms)`` after the backward pass, before clipping and the optimizer.

    ``on_nonfinite="stop"`` raises :class:`TrainingDiverged` at the first non-finite loss term or
    gradient; ``"skip"`` drops that step's update (the data and the schedule move on) and raises
    only after ``max_consecutive_skips`` such steps in a row, since a run that cannot take a
    finite step has diverged. Gradients are not checked when ``check_grads`` is False: fp16's
    GradScaler skips steps with overflowing gradients itself, and lowers its scale.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        on_nonfinite: str,
        max_consecutive_skips: int,
        check_grads: bool,
        last_checkpoint: Callable[[], Path | None],
        log: Callable[[str], None],
    ):
        self.strategy, self.on_nonfinite, self.max_consecutive_skips = strategy, on_nonfinite, max_consecutive_skips
        self.check_grads, self.last_checkpoint, self.log = check_grads, last_checkpoint, log
        self.consecutive = 0

    def allows_update(self, step: int, terms: dict[str, torch.Tensor | None]) -> bool:
        """Whether step ``step`` may apply its update; ``terms`` are the loss and its parts (None: off)."""
        model = self.strategy.model
        named = {name: value.detach().float() for name, value in terms.items() if value is not None}
        flags = [(~torch.isfinite(value)).any() for value in named.values()]
        if self.check_grads:
            flags.append(~torch.isfinite(_gradient_norm(model, self.strategy.env.device)))
        # Above 0: non-finite on some rank. The step's one transfer to the host.
        flags = self.strategy.all_reduce_mean(torch.stack(flags).float()).tolist()
        if self.check_grads and flags[-1] > 0:
            # The norm also overflows for huge finite gradients: look at every entry (a rare path,
            # taken by all ranks together since the flags were reduced).
            bad = torch.stack([~torch.isfinite(_local(p.grad)).all() for p in model.parameters() if p.grad is not None])
            flags[-1] = self.strategy.all_reduce_mean(bad.any().float()[None]).item()
        if not any(flags):
            self.consecutive = 0
            return True
        problem = self._describe(named, flags, model)
        self.consecutive += 1
        if self.on_nonfinite == "skip" and self.consecutive <= self.max_consecutive_skips:
            self.log(f"step {step}: {problem}: update skipped ({self.consecutive} in a row, at most "
                     f"{self.max_consecutive_skips}: optim.max_consecutive_skips)")
            return False
        latest = self.last_checkpoint()
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        in_a_row = f" in {self.consecutive} steps in a row" if self.on_nonfinite == "skip" else ""
        raise TrainingDiverged(
            f"step {step}: {problem}{in_a_row}: training diverged; this step's update was not applied and "
            f"{kept}. Lower optim.lr, set optim.grad_clip, or skip such steps with optim.on_nonfinite=skip"
        )

    def _describe(self, named: dict[str, torch.Tensor], flags: list[float], model: nn.Module) -> str:
        """Which quantity went non-finite: the first loss term (with the others' values), else a gradient."""
        values = {name: value.mean().item() for name, value in named.items()}
        for (name, value), flag in zip(values.items(), flags):
            if flag > 0:
                if math.isfinite(value):  # the term is a rank's own (local_loss): another rank's went bad
                    return f"the loss term {name} is not finite on another rank"
                others = ", ".join(f"{other} {v:.4g}" for other, v in values.items() if other != name)
                return f"the loss term {name} is {value}" + (f" ({others})" if others else "")
        for name, param in model.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(_local(param.grad)).all()):
                return f"the gradient of {name} is not finite (loss {values.get('loss', float('nan')):.4g})"
        return "a gradient is not finite on another rank"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded, DTensor) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _gradient_norm(model: nn.Module, device: torch.device) -> torch.Tensor:
    """The 2-norm of this rank's gradients: non-finite when any gradient is (or, rarely, when
    huge finite ones overflow it: the caller then checks every entry). One fused kernel per
    device and dtype, a few times cheaper than any entry-wise test."""
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.nn.utils.get_total_norm(grads)
