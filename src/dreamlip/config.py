"""Training configuration: dataclasses, YAML presets, ``--set key=value`` overrides, ablation variants.

Every way of making a config goes through :func:`load_config`, which layers, in this order:
defaults -> named preset -> config file (or a mapping) -> ablation variant -> ``--set`` overrides.
Each value is checked against its field's declared type (``Literal`` choices, ``X | None``,
numbers, ``list[str]``) as it is set, so a bad value fails at load naming its source and key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from dreamlip.captions import LongMode, Sampling
from dreamlip.eval import TASK_NAMES, TRAIN_EVAL_TASKS
from dreamlip.objectives import LossConfig, objective_names

__all__ = [
    "ABLATION_VARIANTS",
    "CaptionConfig",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "RESUME_SAFE_FIELDS",
    "TrainConfig",
    "apply_overrides",
    "apply_variant",
    "coerce_dataclass",
    "list_presets",
    "load_config",
    "resume_changes",
]


@dataclass
class ModelConfig:
    name: str = "DreamLIP-ViT-Tiny-64"  # any open_clip architecture, or ours in model_configs/
    pretrained: str | None = None  # an open_clip checkpoint file to fine-tune from
    grad_checkpointing: bool = False
    # the text tower's per-token work over every length bucket at once (faster; the same forward, weight
    # gradients equal up to summation order); auto: where it applies (open_clip's causal CLIP text tower, not FSDP)
    text_packing: Literal["auto"] | bool = "auto"
    context_length: int | None = None  # text positions; None: the architecture's (77 for CLIP's)
    stretch_positions: bool = False  # pretrained with fewer positions: Long-CLIP's stretch to context_length


@dataclass
class DataConfig:
    train: str = ""  # a SPEC (docs/data.md)
    workers: int = 2
    epoch_samples: int | None = None  # samples per epoch over all ranks; default: every record once
    shuffle_buffer: int = 1000


@dataclass
class CaptionConfig:
    k: int = 6  # sub-caption slots per image; 0 = plain CLIP (raw caption only)
    long_mode: LongMode = "sentences"
    use_short: bool = True
    merge: int = 1  # consecutive long-caption sentences joined into one sub-caption
    sampling: Sampling = "subcaptions"  # slots 1..K: pool items (DreamLIP's), or merges of 1..max_merge items (FLAIR's)
    max_merge: int = 3  # with sampling=flair: the most pool items one slot merges


@dataclass
class OptimConfig:
    lr: float = 5e-4
    # the loss's scales and biases (temperatures, SigLIP's bias) learn at this multiple of lr
    logit_lr_multiplier: float = 1.0
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 10_000
    epochs: int = 32
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 256  # per rank, per micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step; negatives span all of them
    grad_clip: float | None = None
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a non-finite loss term or gradient: stop the run, or skip that update
    max_consecutive_skips: int = 10  # with "skip": this many non-finite steps in a row stop the run (it diverged)


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with torchrun: replicate the model, or shard it (FSDP2)
    deterministic: bool = False
    compile: bool = False  # torch.compile the wrapped training forward (docs/training.md, "Scale")
    dist_timeout: float = 1800.0  # seconds a collective waits for every rank (an evaluation on the main rank counts)
    heartbeat_every: float = 300.0  # seconds between heartbeat lines of a multi-rank run (0: none)
    log_every: int = 10
    save_every: int = 1000  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    progress: bool = True
    eval_every: int = 0  # optimizer steps between evaluations (0: never)
    eval_data: str | None = None  # a directory or file that dreamlip.eval understands
    eval_tasks: list[str] = field(default_factory=lambda: list(TRAIN_EVAL_TASKS))
    eval_seg_dense: str = "raw"  # segmentation patch read-out(s), e.g. "raw,naclip" (dreamlip.eval.dense)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        config = cls()
        _update(config, values, source)
        return config


# The paper's ablation ladder (docs/method.md, "The paper's numbers"), each rung a change of the fields
# named here, and the other objectives on the ladder's last texts.
_DREAMLIP = {"loss.objective": "dreamlip"}
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "clip": {**_DREAMLIP, "captions.k": 0, "loss.group_weight": 0.0},
    "long-whole": {**_DREAMLIP, "captions.k": 1, "captions.long_mode": "whole", "captions.use_short": False, "loss.group_weight": 0.0},
    "subcaptions": {**_DREAMLIP, "captions.long_mode": "sentences", "captions.use_short": False, "loss.group_weight": 0.0},
    "short": {**_DREAMLIP, "captions.long_mode": "sentences", "captions.use_short": True, "loss.group_weight": 0.0},
    "dreamlip": {**_DREAMLIP, "captions.long_mode": "sentences", "captions.use_short": True, "loss.group_weight": 1.0},
    # Beyond the ladder: another objective on the same texts (the sub-captions and short captions).
    "siglip": {"loss.objective": "siglip", "captions.long_mode": "sentences", "captions.use_short": True},
    "flair": {"loss.objective": "flair", "captions.long_mode": "sentences", "captions.use_short": True, "captions.sampling": "flair"},
    # COSMOS's text crops: 8 texts an image (captions.k + 1) from the same pool, as its configs.
    "cosmos": {"loss.objective": "cosmos", "captions.k": 7, "captions.long_mode": "sentences", "captions.use_short": True},
}


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("dreamlip").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def load_config(
    preset: str | None = None,
    config_file: str | Path | Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
    *,
    variant: str | None = None,
) -> TrainConfig:
    """The one way to build a config: defaults -> ``preset`` -> ``config_file`` -> ``variant`` ->
    ``overrides``, each layer over the ones before.

    ``config_file`` is a YAML path or a mapping of the same shape (nested sections or flat
    ``section.field`` keys), for callers such as the demo that set a run's fields in code; a
    variant comes after it so ``captions.k`` of ``clip`` (0) wins over a file's, and ``--set``
    comes last so ``--variant dreamlip --set loss.group_weight=0.1`` trains with 0.1.
    """
    config = TrainConfig()
    if preset is not None:
        path = resources.files("dreamlip").joinpath("configs", f"{preset}.yaml")
        if not path.is_file():
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(list_presets())}")
        _update(config, yaml.safe_load(path.read_text()) or {}, f"preset {preset}")
    if isinstance(config_file, Mapping):
        _update(config, config_file, "config")
    elif config_file is not None:
        _update(config, _read_yaml(Path(config_file)), str(config_file))
    if variant:
        apply_variant(config, variant)
    return apply_overrides(config, overrides)


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``section.field=value`` strings; values are parsed as YAML (``1e-3``, ``null``, ``true``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw  # e.g. a path with braces: string fields take the text as written
        _set(config, key.strip(), value, "--set", raw=raw)
    return config


def apply_variant(config: TrainConfig, variant: str) -> TrainConfig:
    """Switch ``config`` to one rung of the ablation ladder (``ABLATION_VARIANTS``)."""
    if variant not in ABLATION_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(ABLATION_VARIANTS)}")
    for key, value in ABLATION_VARIANTS[variant].items():
        _set(config, key, value, f"variant {variant}")
    return config


# Fields a resume may change without breaking its exactness: when to stop, log, evaluate and
# save, and how the same computation is laid out (workers, device, strategy, recomputation,
# which rank computes which logits). Everything else (model, data, captions, seed, batch,
# accumulation, loss, optimizer and its schedule, precision) is refused: see resume_changes.
RESUME_SAFE_FIELDS = frozenset(
    {
        "optim.max_steps",
        "optim.epochs",
        "optim.on_nonfinite",
        "optim.max_consecutive_skips",
        "data.workers",
        "model.grad_checkpointing",
        "model.text_packing",
        "loss.local_loss",
        "run.device",
        "run.strategy",
        "run.deterministic",
        "run.compile",
        "run.dist_timeout",
        "run.heartbeat_every",
        "run.log_every",
        "run.save_every",
        "run.keep_checkpoints",
        "run.progress",
        "run.eval_every",
        "run.eval_data",
        "run.eval_tasks",
        "run.eval_seg_dense",
    }
)


def resume_changes(saved: Mapping[str, Any], config: TrainConfig) -> tuple[list[str], list[str]]:
    """Compare a checkpoint's config with the one a resume runs with.

    Returns ``(refused, allowed)``: ``"key: old -> new"`` lines for the changed fields that would
    break an exact resume and for those in :data:`RESUME_SAFE_FIELDS`. A field the checkpoint
    lacks (written by an older version) counts as its default.
    """
    before = _flatten(TrainConfig().to_dict()) | _flatten(saved)
    after = _flatten(config.to_dict())
    refused, allowed = [], []
    for key, new in after.items():
        old = before.get(key)
        if old != new:
            (allowed if key in RESUME_SAFE_FIELDS else refused).append(f"{key}: {old!r} -> {new!r}")
    return refused, allowed


def coerce_dataclass(cls: type, values: Mapping[str, Any], source: str):
    """An instance of dataclass ``cls`` from ``values``, each checked against its declared type."""
    fields = _declared_types(cls)
    unknown = set(values) - fields.keys()
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; {cls.__name__} has {', '.join(fields)}")
    return cls(**{name: _coerce(value, fields[name], f"{source}: {name}") for name, value in values.items()})


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _update(config: TrainConfig, values: Any, source: str) -> None:
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    for key, value in _flatten(values).items():
        _set(config, key, value, source)


# Counts that must be at least 1 (0 would divide by zero or never step).
_AT_LEAST_ONE = {
    "optim.batch_size", "optim.accum_steps", "optim.max_consecutive_skips", "run.log_every", "run.save_every",
    "run.keep_checkpoints",
}
# Above 0: temperatures and scales (their logs are taken) and the collective timeout.
_POSITIVE = {"loss.group_temperature_init", "loss.group_temperature_min", "loss.sigmoid_scale_init", "run.dist_timeout"}


def _set(config: TrainConfig, key: str, value: Any, source: str, raw: str | None = None) -> None:
    section_name, _, field_name = key.partition(".")
    section = getattr(config, section_name, None)
    if not dataclasses.is_dataclass(section) or not field_name:
        sections = ", ".join(f.name for f in dataclasses.fields(config))
        raise ValueError(f"{source}: unknown key {key!r}; keys look like SECTION.FIELD with SECTION in {sections}")
    fields = _declared_types(type(section))
    if field_name not in fields:
        raise ValueError(f"{source}: unknown key {key!r}; {section_name} has {', '.join(fields)}")
    value = _coerce(value, fields[field_name], f"{source}: {key}", raw)
    if key in _AT_LEAST_ONE and value < 1:
        raise ValueError(f"{source}: {key} must be at least 1; got {value!r}")
    if key in _POSITIVE and not value > 0:
        raise ValueError(f"{source}: {key} must be above 0; got {value!r}")
    if key == "run.heartbeat_every" and value < 0:
        raise ValueError(f"{source}: {key} must be 0 (off) or more; got {value!r}")
    if key == "loss.objective":
        objective_names(value, f"{source}: {key}")
    if key == "run.eval_tasks" and not set(value) <= set(TASK_NAMES):
        unknown = [task for task in value if task not in TASK_NAMES]
        raise ValueError(f"{source}: {key}: unknown task(s) {unknown}; choose from {', '.join(TASK_NAMES)}")
    setattr(section, field_name, value)


@cache
def _declared_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, declared: Any, where: str, raw: str | None = None) -> Any:
    """``value`` as the declared type says, or a ValueError naming ``where`` and what is accepted."""
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            with contextlib.suppress(ValueError):
                return _coerce(value, option, where, raw)
    elif origin is Literal:
        if value in args:
            return value
    elif origin is list:
        if raw is not None and not isinstance(value, (list, tuple)):  # YAML read "--set loss.objective_weights=2" as a number
            value = raw
        if isinstance(value, str):  # --set run.eval_tasks=zeroshot,retrieval
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            return [_coerce(item, args[0], where) for item in value]
    elif declared is bool:
        if isinstance(value, bool):
            return value
    elif declared in (int, float):
        number = _number(value, declared)
        if number is not None:
            return number
    elif declared is str:
        if isinstance(value, str):
            return value
        if raw is not None and value is not None:  # YAML read "2024" or "1.0" as a number
            return raw.strip()
    else:
        raise TypeError(f"{where}: no validation for declared type {declared!r}")
    raise ValueError(f"{where} must be {_describe(declared)}; got {value!r}")


def _number(value: Any, declared: type) -> int | float | None:
    """``value`` as an int or float field takes it (YAML 1.1 reads ``1e-1`` as a string), else None."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if declared is float:
        return float(value)
    return int(value) if float(value).is_integer() else None


def _describe(declared: Any) -> str:
    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) if a is not type(None) else "null" for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[declared]
