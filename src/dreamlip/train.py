"""``dreamlip train``: the DreamLIP training loop.

One optimizer step = ``accum_steps`` micro-batches per rank. The loss is always over the global
batch (all ranks, all micro-batches): with accumulation, embeddings of the whole step are first
computed without gradients, then each micro-batch is re-encoded with gradients and the loss is
taken with the others' cached embeddings, so the summed gradients equal one big batch's (the
contrastive negatives span every micro-batch). Checkpoints hold everything needed to continue
mid-epoch exactly: weights, optimizer, scheduler, scaler, RNG states and the data position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import operator
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm import tqdm

from dreamlip.captions import SubcaptionSampler
from dreamlip.checkpoint import Checkpointer, TrainState, model_payload, save_checkpoint, split_weights
from dreamlip.config import TrainConfig, resume_changes
from dreamlip.data.loader import TrainLoader, build_train_loader
from dreamlip.distributed import DistEnv, RankMonitor, Strategy, init_distributed, make_strategy, shutdown_distributed
from dreamlip.divergence import DivergenceGuard
from dreamlip.io import DiskFull, atomic_write
from dreamlip.loading import load_model
from dreamlip.model import DreamLIPModel, PatchTokensUnavailable, create_model, get_tokenizer
from dreamlip.objectives import Objective, Outputs, build_objective
from dreamlip.views import view_sampler_and_transform

__all__ = ["StepResult", "TrainModule", "TrainStep", "WarmupCosine", "parameter_groups", "sampler_and_transform", "train"]

CHECKPOINT_DIR = "checkpoints"
# The model output that is one tensor for the whole step; a step's micro-batches concatenate the others.
_PER_STEP = "logit_scale"
# Outputs whose text-length dim differs between micro-batches (each runs its own longest text): padded to concatenate.
_TEXT_LENGTH_DIM = {"token_emb": 2, "token_mask": 2}


class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``.

    A callable object (not a lambda) so ``LambdaLR.state_dict`` saves its settings.
    """

    def __init__(self, warmup_steps: int, total_steps: int):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float, logit_lr_multiplier: float = 1.0) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on norms, biases, 1-d embeddings or temperatures. The
    loss's scales and biases (``*logit_scale``, ``*logit_bias``) learn at ``logit_lr_multiplier``
    x ``lr`` in a group of their own when that is not 1. Under FSDP2 the sharded parameters
    (DTensors) and the replicated ones (an objective's pooler) go in groups of their own: one fused
    optimizer step cannot mix the two."""
    from torch.distributed.tensor import DTensor

    groups: dict[tuple[bool, bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            logit = name.endswith(("logit_scale", "logit_bias"))
            decays = not (param.ndim < 2 or logit)
            fast = logit and logit_lr_multiplier != 1.0
            groups.setdefault((decays, fast, isinstance(param, DTensor)), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * logit_lr_multiplier if fast else lr}
        for (decays, fast, _), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))
    ]


def _autocast(device: torch.device, precision: str):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), precision


class TrainModule(nn.Module):
    """The model and the objective as one module: what the strategy wraps (DDP, FSDP2) and the
    optimizer trains, so both parameter sets are synchronised, checkpointed and resumed alike
    (state dict keys ``model.*`` and ``objective.*``)."""

    def __init__(self, model: DreamLIPModel, objective: Objective):
        super().__init__()
        # The objective first: the parameters' order (gradient clipping sums their norms in it) is then
        # what it was when the grouping temperature, the one objective parameter, was the model's first.
        self.objective = objective
        self.model = model

    def forward(
        self, images: torch.Tensor, texts: torch.Tensor, local_images: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor | None]:
        """The model outputs the objective needs, by name (``dreamlip.objectives.Outputs``), the
        embeddings in fp32. A batch of views (``local_images`` given) the objective encodes itself."""
        if local_images is not None:
            return self.objective.encode_views(self.model, images, local_images, texts)
        needs = self.objective.needs
        out = self.model(images, texts, needs.patches, needs.tokens, needs.patch_projection_grad)
        floats = {name: getattr(out, name) for name in ("image_emb", "text_emb", "patch_emb", "token_emb")}
        floats = {name: t if t is None else t.float() for name, t in floats.items()}
        return floats | {"token_mask": out.token_mask, "logit_scale": out.logit_scale}


@dataclass
class StepResult:
    loss: torch.Tensor  # the sum of the terms
    terms: dict[str, torch.Tensor]  # the objective's named, weighted terms


class TrainStep:
    """``train_step(micro_batches, step) -> StepResult``: forward and backward of one optimizer step.

    The gradients of the global-batch loss (all ranks, all micro-batches) are left in the
    parameters' ``.grad``; the optimizer step is the caller's. ``step`` (optimizer steps done) goes
    to the objective. ``autocast`` makes the autocast context (a no-op for fp32) around the model,
    and ``scaler`` scales the loss for fp16; the objective runs in fp32.
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
    ):
        self.strategy, self.autocast = strategy, autocast
        self.scaler = scaler or torch.amp.GradScaler(strategy.env.device.type, enabled=False)

    def __call__(self, micro_batches: list[dict[str, Any]], step: int = 0) -> StepResult:
        net, unit = self.strategy.net, self.strategy.model
        if len(micro_batches) == 1:
            with self.autocast():
                outputs = net(*self._inputs(micro_batches[0]))
            result = _result(unit.objective(outputs, step))
            self.scaler.scale(result.loss).backward()
            self.strategy.reduce_replicated_grads()
            return result
        # The unwrapped module, not DDP's wrapper: no backward follows, so no gradient hooks are
        # wanted (under FSDP2 both are the sharded module, which gathers its weights either way).
        with torch.no_grad(), self.autocast():
            cached = [unit(*self._inputs(batch)) for batch in micro_batches]
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with self.strategy.gradient_sync(enabled=last):
                with self.autocast():
                    fresh = net(*self._inputs(batch))
                outputs: dict[str, torch.Tensor | None] = {
                    name: _cat_micro_batches([fresh if i == index else cached[i] for i in range(len(micro_batches))], name)
                    for name in fresh if name != _PER_STEP
                }
                # Every micro-batch's loss is the whole step's loss, so the temperatures (and any other
                # parameter of the loss itself) would collect their gradient once per micro-batch;
                # only the last pass lets it through.
                outputs[_PER_STEP] = fresh[_PER_STEP] if last else fresh[_PER_STEP].detach()
                terms = unit.objective(outputs, step) if last else _with_frozen_parameters(unit.objective, outputs, step)
                result = _result(terms)
                self.scaler.scale(result.loss).backward()
        self.strategy.reduce_replicated_grads()
        return result

    def _inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        device = self.strategy.env.device
        names = ("images", "texts", "local_images") if "local_images" in batch else ("images", "texts")
        return tuple(batch[name].to(device, non_blocking=True) for name in names)


def _result(terms: dict[str, torch.Tensor]) -> StepResult:
    if not terms:
        raise ValueError("the objective returned no loss term")
    return StepResult(loss=functools.reduce(operator.add, terms.values()), terms=terms)


def _with_frozen_parameters(objective: Objective, outputs: Outputs, step: int) -> dict[str, torch.Tensor]:
    """``objective(outputs, step)`` with its own parameters as constants to autograd."""
    frozen = {name: param.detach() for name, param in objective.named_parameters()}
    return torch.func.functional_call(objective, frozen, (outputs, step))


def _cat_micro_batches(outputs: list[dict[str, torch.Tensor | None]], name: str) -> torch.Tensor | None:
    """Micro-batches' ``name`` tensors as one batch; texts' token tensors zero-padded to the longest first."""
    parts = [output[name] for output in outputs]
    if parts[0] is None:
        return None
    dim = _TEXT_LENGTH_DIM.get(name)
    if dim is not None:
        longest = max(part.shape[dim] for part in parts)
        parts = [F.pad(part, (0, 0) * (part.ndim - dim - 1) + (0, longest - part.shape[dim])) for part in parts]
    return torch.cat(parts)


def train(config: TrainConfig, out_dir: str | Path, resume: str | None = None) -> dict[str, Any]:
    """Train as ``config`` says, writing checkpoints, ``metrics.jsonl`` and tensorboard logs to ``out_dir``."""
    out_dir = Path(out_dir)
    run_cfg = config.run
    env = init_distributed(run_cfg.device, timeout=run_cfg.dist_timeout)
    monitor = None
    try:
        if env.is_distributed:
            monitor = RankMonitor(env, timeout=run_cfg.dist_timeout, log_every=run_cfg.heartbeat_every, log=tqdm.write)
        return _train(config, out_dir, resume, env, monitor)
    except Exception as err:
        if monitor is not None:
            monitor.explain(err)  # a silent rank: say which
        raise
    finally:
        if monitor is not None:
            monitor.close()
        shutdown_distributed()


def _train(config: TrainConfig, out_dir: Path, resume: str | None, env: DistEnv, monitor: RankMonitor | None) -> dict[str, Any]:
    if not config.data.train:
        raise ValueError("no training data: give --data SPEC (or data.train in the config)")
    run_cfg = config.run
    strategy = make_strategy(run_cfg.strategy, env)
    checkpointer = Checkpointer(out_dir / CHECKPOINT_DIR, keep=run_cfg.keep_checkpoints)
    if strategy.is_main:
        checkpointer.remove_stale()
    checkpoint_path, checkpoint, changes = _resume_from(checkpointer, resume, config, env)
    run = _build(config, strategy, checkpoint)
    state = run.restore(checkpoint) if checkpoint is not None else TrainState()
    resumed_at = state.step if checkpoint is not None else None
    if strategy.is_main:
        _record_config(out_dir, config, resumed_at, changes)
    # --resume with no checkpoint yet restarts from step 0: the dead attempt's records go too.
    logger = _RunLogger(out_dir, strategy.is_main, resumed_at if checkpoint is not None else (0 if resume else None))
    progress = tqdm(total=run.total_steps, initial=state.step, disable=not (strategy.is_main and run_cfg.progress),
                    desc="train", dynamic_ncols=True)
    _announce(progress, strategy, checkpoint_path, resumed_at, changes)
    evaluator = _evaluator(config, strategy, run.eval_transform)
    run.guard = _divergence_guard(config, strategy, checkpointer, progress, run.scaler)
    last_record: dict[str, Any] = {}
    run.window_start = time.perf_counter()
    while state.step < run.total_steps:
        for micro_batches in run.epoch(state, progress):
            result = run.step(micro_batches, state)
            state.step += 1
            if monitor is not None:
                monitor.step = state.step
            state.batch_in_epoch += len(micro_batches)
            progress.update(1)
            final = state.step == run.total_steps
            if state.step % run_cfg.log_every == 0 or final:
                last_record = run.train_record(result, state)
                logger.log(last_record)
                progress.set_postfix(loss=f"{last_record['loss']:.3f}", lr=f"{last_record['lr']:.2e}",
                                     img_s=f"{last_record['samples_per_s']:.0f}")
            if evaluator is not None and (state.step % run_cfg.eval_every == 0 or final):
                eval_started = time.perf_counter()
                results = evaluator()  # None on the ranks that only helped gather the weights
                eval_seconds = time.perf_counter() - eval_started
                run.window_start += eval_seconds  # samples_per_s measures training only
                if results is not None:
                    logger.log({"step": state.step, **{f"eval/{k}": v for k, v in results.items()}, "eval_seconds": eval_seconds})
            if state.step % run_cfg.save_every == 0 or final:
                with _naming_last_good(checkpointer):
                    run.save(checkpointer, state)
        state.epoch += 1
        state.batch_in_epoch, state.records_read = 0, None
    progress.close()
    with _naming_last_good(checkpointer):
        return run.finish(state, last_record, out_dir, logger)


@dataclass
class _Run:
    """What ``_train`` builds before its loop, and the steps of the loop that use it."""

    config: TrainConfig
    strategy: Strategy
    loader: TrainLoader
    train_step: TrainStep
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    eval_transform: Any
    total_steps: int
    global_batch: int  # the images one optimizer step scores together: every rank's, every micro-batch's
    guard: DivergenceGuard | None = None  # set once the checkpointer and the log exist
    window_start: float = 0.0  # throughput: since the last record (or the loop's start)
    window_samples: int = 0

    def restore(self, checkpoint: dict[str, Any]) -> TrainState:
        """Optimizer, scheduler, scaler and the run's position from a step checkpoint."""
        device = self.strategy.env.device
        self.strategy.load_optimizer_state_dict(self.optimizer, checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        _retarget_schedule(self.scheduler, self.total_steps)
        self.scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState()
        state.load_state_dict(checkpoint["train_state"], device)
        if not self.strategy.is_main:  # the saved counts are the sum over ranks: the main rank carries them
            state.skips.clear()
        return state

    def epoch(self, state: TrainState, progress: tqdm) -> Iterator[list[dict[str, Any]]]:
        """The micro-batches of each optimizer step left in ``state``'s epoch, counting skips."""
        accum = self.config.optim.accum_steps
        self.loader.set_epoch(state.epoch, state.batch_in_epoch, _records_read_of_rank(state, self.loader, self.strategy, progress))
        batches = iter(self.loader)
        while state.step < self.total_steps and state.batch_in_epoch + accum <= self.loader.num_batches:
            micro_batches = [next(batches) for _ in range(accum)]
            for batch in micro_batches:
                state.skips.update(batch["skips"])
            yield micro_batches

    def step(self, micro_batches: list[dict[str, Any]], state: TrainState) -> StepResult:
        """One optimizer step: gradients, the divergence guard, clipping, update, schedule,
        temperature clamps. A step the guard skips moves the schedule on but not the weights."""
        unit, optim_cfg = self.strategy.model, self.config.optim
        self.strategy.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        # The scheduler counts the steps done (restored on resume): what a term's weight schedule follows.
        result = self.train_step(micro_batches, self.scheduler.last_epoch)
        unit.objective.after_backward(unit.model, self.scheduler.last_epoch, self.total_steps)
        if self.guard.allows_update(state.step + 1, {**result.terms, "loss": result.loss}):
            if optim_cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                self.strategy.clip_grad_norm_(optim_cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            state.skipped_steps += 1
        self.scheduler.step()
        unit.model.clamp_logit_scale()
        unit.objective.clamp_parameters()
        self.window_samples += self.global_batch
        return result

    def train_record(self, result: StepResult, state: TrainState) -> dict[str, Any]:
        """The metrics.jsonl record of this step (a collective: every rank calls it): the loss, each
        of the objective's terms as ``loss/<name>`` (they sum to it) and its parameters' scalars."""
        values = torch.stack([t.detach().float() for t in (result.loss, *result.terms.values())])
        loss, *terms = self.strategy.all_reduce_mean(values).tolist()
        unit = self.strategy.model
        temperature = {"logit_scale": float(unit.model.logit_scale.detach().exp())} if unit.objective.needs.logit_scale else {}
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": state.step,
            "epoch": state.epoch,
            "loss": loss,
            **{f"loss/{name}": value for name, value in zip(result.terms, terms)},
            "lr": self.scheduler.get_last_lr()[0],
            **temperature,
            **unit.objective.scalars(),
            "samples_per_s": self.window_samples / max(elapsed, 1e-9),
            "skipped": self.strategy.reduce_counts(state.skips),
            "skipped_steps": state.skipped_steps,  # updates dropped for a non-finite loss or gradient
        }
        self.window_start, self.window_samples = time.perf_counter(), 0
        return record

    def save(self, checkpointer: Checkpointer, state: TrainState) -> None:
        """A step checkpoint (a collective: the data position and skip counts come from every rank)."""
        strategy = self.strategy
        records_read = strategy.gather_lists(self.loader.records_read) if self.loader.records_read is not None else state.records_read
        whole = dataclasses.replace(state, records_read=records_read, skips=Counter(strategy.reduce_counts(state.skips)))
        weights, optimizer_state = strategy.model_state_dict(), strategy.optimizer_state_dict(self.optimizer)
        if strategy.is_main:
            checkpointer.save(
                model_payload(self.config.model.name, *split_weights(weights), self.config.to_dict(), state.step),
                optimizer=optimizer_state,
                scheduler=self.scheduler.state_dict(),
                scaler=self.scaler.state_dict(),
                train_state=whole.state_dict(strategy.env.device),
            )

    def finish(self, state: TrainState, last_record: dict[str, Any], out_dir: Path, logger: _RunLogger) -> dict[str, Any]:
        """``model.pt`` and ``summary.json``; returns the summary."""
        skipped = self.strategy.reduce_counts(state.skips)
        summary = {"steps": state.step, "final": last_record, "skipped": skipped, "skipped_steps": state.skipped_steps,
                   "out_dir": str(out_dir)}
        weights = self.strategy.model_state_dict()
        if self.strategy.is_main:
            payload = model_payload(self.config.model.name, *split_weights(weights), self.config.to_dict(), state.step)
            save_checkpoint(out_dir / "model.pt", payload)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            if skipped:
                print(f"skipped samples: {json.dumps(skipped)}")
            if state.skipped_steps:
                print(f"skipped steps (non-finite loss or gradient, optim.on_nonfinite=skip): {state.skipped_steps}")
        logger.close()
        return summary


def _build(config: TrainConfig, strategy: Strategy, checkpoint: dict[str, Any] | None) -> _Run:
    """Seeds, model (with the checkpoint's weights), loss, data, optimizer, schedule and scaler."""
    optim_cfg, run_cfg, env = config.optim, config.run, strategy.env
    random.seed(run_cfg.seed)
    torch.manual_seed(run_cfg.seed)  # the same on every rank: identical initial weights
    if run_cfg.deterministic:
        torch.use_deterministic_algorithms(True)

    context_length = config.model.context_length
    pretrained = None
    if config.model.pretrained:  # fine-tuning: open_clip weights, one of our checkpoints or exports
        pretrained = load_model(
            config.model.pretrained, model_name=config.model.name, device=env.device,
            context_length=context_length, stretch_positions=config.model.stretch_positions,
        )
        model, train_transform, eval_transform = pretrained.model, pretrained.train_transform, pretrained.eval_transform
    else:
        model, train_transform, eval_transform = create_model(config.model.name, device=env.device, context_length=context_length)
    model.clip.set_grad_checkpointing(config.model.grad_checkpointing)
    # By run.strategy, not the process count: a one-process fsdp run encodes text as its multi-rank run would
    model.text_packing = model.resolve_text_packing(config.model.text_packing, sharded=config.run.strategy == "fsdp")
    # After the model: whatever the objective draws at initialisation, the model starts the same under every objective.
    global_batch = config.optim.batch_size * config.optim.accum_steps * env.world_size
    objective = build_objective(config.loss, text_slots=config.captions.k + 1, embed_dim=model.embed_dim, global_batch=global_batch).to(env.device)
    if pretrained is not None and pretrained.objective is not None and pretrained.objective.name == objective.name:
        objective.load_state_dict(pretrained.objective.state_dict())  # its temperatures, biases, poolers go on
    elif pretrained is not None:
        objective.start_from_open_clip(model.clip)  # an open_clip SigLIP's bias goes on
    elif objective.model_logit_scale_init is not None:
        with torch.no_grad():
            model.clip.logit_scale.fill_(objective.model_logit_scale_init)
    if getattr(model.clip, "logit_bias", None) is not None:
        # an open_clip sigmoid model's own bias: the objective's trains in its place (an unused
        # parameter DDP would refuse), and an export writes the objective's
        model.clip.logit_bias.requires_grad_(False)
    if objective.needs.patches and not model.has_patch_tokens:
        raise PatchTokensUnavailable(
            f"{config.model.name}: the {objective.name} objective needs a ViT image tower with patch tokens"
            + (f"; {objective.needs_hint}" if objective.needs_hint else "")
        )
    # An objective with a temperature of its own leaves the model's unused, which DDP would refuse.
    model.clip.logit_scale.requires_grad_(objective.needs.logit_scale)
    objective.check_strategy(strategy.sharded)
    objective.bind(model)

    sampler, train_transform = sampler_and_transform(config, objective, model, train_transform)
    loader = build_train_loader(
        config.data.train,
        sampler=sampler,
        tokenizer=get_tokenizer(config.model.name, context_length),
        batch_size=optim_cfg.batch_size,
        transform=train_transform,
        num_workers=config.data.workers,
        seed=run_cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        epoch_samples=config.data.epoch_samples,
        shuffle_buffer=config.data.shuffle_buffer,
        pin_memory=env.device.type == "cuda",
    )
    steps_per_epoch = loader.num_batches // optim_cfg.accum_steps
    if steps_per_epoch < 1:
        raise ValueError(
            f"one optimizer step needs {optim_cfg.accum_steps} batches of {optim_cfg.batch_size} x "
            f"{env.world_size} ranks, but an epoch has only {loader.num_batches} batches"
        )
    total_steps = optim_cfg.max_steps or optim_cfg.epochs * steps_per_epoch
    objective.set_run_length(total_steps)

    if checkpoint is not None:  # before wrapping: FSDP2 then shards these weights
        model.load_state_dict(checkpoint["model"])
        objective.load_state_dict(checkpoint["objective"])
    strategy.wrap(TrainModule(model, objective), compile=run_cfg.compile)
    optimizer = torch.optim.AdamW(  # after wrapping: under FSDP2 it must hold the sharded parameters
        parameter_groups(strategy.model, optim_cfg.weight_decay, optim_cfg.lr, optim_cfg.logit_lr_multiplier),
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        # One fused kernel per step instead of a dozen ops per parameter (about 4x faster on CPU).
        fused=env.device.type in ("cpu", "cuda"),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(optim_cfg.warmup_steps, total_steps))
    autocast, precision = _autocast(env.device, run_cfg.precision)
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    train_step = TrainStep(strategy, autocast=autocast, scaler=scaler)
    return _Run(config, strategy, loader, train_step, optimizer, scheduler, scaler, eval_transform, total_steps, global_batch)


def sampler_and_transform(config: TrainConfig, objective: Objective, model: DreamLIPModel, transform: Any):
    """What the loader draws each sample's texts with and the image transform it applies: the
    ``captions.*`` sub-caption sampler and ``transform``, or, for an objective that reads several
    views, its text crops and multi-crop views."""
    sampler = SubcaptionSampler(
        k=config.captions.k,
        long_mode=config.captions.long_mode,
        use_short=config.captions.use_short,
        merge=config.captions.merge,
        sampling=config.captions.sampling,
        max_merge=config.captions.max_merge,
        seed=config.run.seed,
    )
    if objective.views is None:
        return sampler, transform
    return view_sampler_and_transform(objective.views, sampler, model)


def _divergence_guard(config: TrainConfig, strategy: Strategy, checkpointer: Checkpointer, progress: tqdm,
                      scaler: torch.amp.GradScaler) -> DivergenceGuard:
    """The guard the config asks for; only the main rank logs its skips."""
    return DivergenceGuard(
        strategy,
        on_nonfinite=config.optim.on_nonfinite,
        max_consecutive_skips=config.optim.max_consecutive_skips,
        check_grads=not scaler.is_enabled(),  # fp16: the scaler skips overflowing steps itself
        last_checkpoint=checkpointer.latest,
        log=progress.write if strategy.is_main else lambda line: None,
    )


@contextlib.contextmanager
def _naming_last_good(checkpointer: Checkpointer) -> Iterator[None]:
    """A save that runs out of space says which checkpoint is still there to resume from."""
    try:
        yield
    except DiskFull as err:
        latest = checkpointer.latest()
        kept = (f"the last good checkpoint is {latest} (--resume latest once there is space)" if latest
                else "no checkpoint was written before")
        raise DiskFull(f"{err}; {kept}") from None


def _announce(progress: tqdm, strategy: Strategy, checkpoint_path: Path | None, resumed_at: int | None, changes: list[str]) -> None:
    if not strategy.is_main:
        return
    if checkpoint_path is not None:
        progress.write(f"resumed from {checkpoint_path} at step {resumed_at}")
        for change in changes:
            progress.write(f"  changed on resume: {change}")
    if strategy.env.is_distributed:
        progress.write(f"{strategy.env.world_size} ranks, {strategy.describe()}")


def _resume_from(checkpointer: Checkpointer, resume: str | None, config: TrainConfig, env: DistEnv):
    """``(path, payload, allowed changes)`` of the checkpoint to resume from (Nones and [] for a
    fresh start). A config that differs from the checkpoint's in a field that an exact resume
    cannot honour (config.RESUME_SAFE_FIELDS says which may change) is refused here, in one
    message listing every such field, before a model is built or a file written."""
    path = checkpointer.resolve(resume) if resume else None
    if path is None:
        return None, None, []
    payload = checkpointer.load(path, map_location=env.device)
    refused, allowed = resume_changes(payload["config"], config)
    if refused:
        raise ValueError(
            f"cannot resume {path}: the config differs from the checkpoint's in settings an exact resume "
            f"cannot honour:\n  " + "\n  ".join(refused) + "\nRun with the checkpoint's values (its config "
            "is in the run's config.yaml and config-history/), or start a new run from its weights "
            f"with --set model.pretrained={path}"
        )
    return path, payload, allowed


def _retarget_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """A resume with a new max_steps / epochs decays the lr to 0 at the new end: the restored
    scheduler state holds the old end, which would leave lr at 0 past it (or end early)."""
    schedule = scheduler.lr_lambdas[0]
    if schedule.total_steps == total_steps:
        return
    schedule.total_steps = total_steps
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _record_config(out_dir: Path, config: TrainConfig, resumed_at: int | None, changes: list[str]) -> None:
    """``config.yaml`` is the run's first config; each resume adds config-history/resume-step_N.yaml
    (its config, its changes listed at the top) so no setting a run had is ever lost."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    first = out_dir / "config.yaml"
    if resumed_at is None or not first.exists():
        first.write_text(text)
    if resumed_at is None:
        return
    history = out_dir / "config-history"
    history.mkdir(exist_ok=True)
    path = history / f"resume-step_{resumed_at:08d}.yaml"
    for attempt in itertools.count(2):  # resumed from the same step again: keep every file
        if not path.exists():
            break
        path = history / f"resume-step_{resumed_at:08d}-{attempt}.yaml"
    header = "".join(f"# {change}\n" for change in changes) or "# no changes\n"
    path.write_text(f"# resumed at step {resumed_at}; changed from the checkpoint's config:\n{header}{text}")


def _evaluator(config: TrainConfig, strategy: Strategy, eval_transform) -> Callable[[], dict[str, float] | None] | None:
    """Held-out evaluation every ``run.eval_every`` steps (None when off).

    It runs on the main rank. A sharded model can't run forward on one rank alone, so there every
    rank gathers the weights and the main rank evaluates a plain copy of the model.
    """
    if not (config.run.eval_every and config.run.eval_data):
        return None
    if not (strategy.is_main or strategy.sharded):
        return None
    from dreamlip.eval import Conditioning, build_tasks, evaluate

    device = strategy.env.device
    # a pooler (FLAIR's): zero-shot and retrieval scored its way too, as `dreamlip eval` does by default
    pooler = strategy.model.objective.conditioned_pooler
    conditioning = Conditioning(pooler) if pooler is not None else None
    tokenizer = get_tokenizer(config.model.name, config.model.context_length)
    dense = {"dense": config.run.eval_seg_dense} if "segmentation" in config.run.eval_tasks else {}
    tasks = build_tasks(config.run.eval_data, config.run.eval_tasks, **dense) if strategy.is_main else None
    copy = create_model(config.model.name, device=device, context_length=config.model.context_length)[0] if strategy.sharded and strategy.is_main else None

    def run_eval() -> dict[str, float] | None:
        if not strategy.sharded:
            return evaluate(strategy.model.model, tokenizer, eval_transform, tasks, device=device, progress=False, conditioning=conditioning)
        weights = strategy.model_state_dict()  # collective: every rank takes part
        if not strategy.is_main:
            return None
        copy.load_state_dict(split_weights(weights)[0])
        return evaluate(copy, tokenizer, eval_transform, tasks, device=device, progress=False, conditioning=conditioning)

    return run_eval


def _records_read_of_rank(state: TrainState, loader: TrainLoader, strategy: Strategy, progress: tqdm) -> list[int] | None:
    """This rank's saved stream position, if the run saved one for the same ranks and workers."""
    saved, env = state.records_read, strategy.env
    if state.batch_in_epoch == 0 or loader.records_read is None or saved is None:
        return None
    if len(saved) != env.world_size or len(saved[env.rank]) != len(loader.records_read):
        progress.write(
            f"resuming on {env.world_size} ranks x {len(loader.records_read)} readers, saved with "
            f"{len(saved)} x {len(saved[0])}: the rest of this epoch is a fresh draw of the data"
        )
        return None
    return saved[env.rank]


class _RunLogger:
    """``metrics.jsonl`` and tensorboard scalars, on the main rank only.

    A resume from step S continues both as one run: records after S (logged before the kill, and
    about to be logged again) are dropped from metrics.jsonl, and tensorboard purges its events
    from step S + 1 on (``purge_step``).
    """

    def __init__(self, out_dir: Path, enabled: bool, resumed_at: int | None):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        path = out_dir / "metrics.jsonl"
        if resumed_at is not None and path.exists():
            _truncate_metrics(path, resumed_at)
        self.metrics = open(path, "a", encoding="utf-8")
        purge = resumed_at + 1 if resumed_at is not None else None
        self.tensorboard = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.tensorboard.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to ``last_step``, atomically; a line torn by a kill is dropped."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("step", 0) <= last_step:
                kept.append(line + "\n")
    atomic_write(path, lambda handle: handle.writelines(kept))
