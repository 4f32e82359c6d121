"""Training configuration: dataclasses, YAML presets, ``--set key=value`` overrides, ablation variants."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ABLATION_VARIANTS",
    "CaptionConfig",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "apply_variant",
    "list_presets",
    "load_config",
]


@dataclass
class ModelConfig:
    name: str = "DreamLIP-ViT-Tiny-64"  # any open_clip architecture, or ours in model_configs/
    pretrained: str | None = None  # an open_clip checkpoint file to fine-tune from
    grad_checkpointing: bool = False
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
    long_mode: Literal["sentences", "whole", "none"] = "sentences"
    use_short: bool = True
    merge: int = 1  # consecutive long-caption sentences joined into one sub-caption


@dataclass
class LossConfig:
    global_weight: float = 1.0
    group_weight: float = 1.0  # 0 turns the grouping loss off
    group_threshold: float | None = None  # None: 1/N
    group_negatives: Literal["image", "batch"] = "image"
    local_loss: bool = False  # each rank computes only its rows of the global logits


@dataclass
class OptimConfig:
    lr: float = 5e-4
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


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with torchrun: replicate the model, or shard it (FSDP2)
    deterministic: bool = False
    log_every: int = 10
    save_every: int = 1000  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    progress: bool = True
    eval_every: int = 0  # optimizer steps between evaluations (0: never)
    eval_data: str | None = None  # a directory or file that dreamlip.eval understands
    eval_tasks: list[str] = field(default_factory=lambda: ["zeroshot", "retrieval", "segmentation"])


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
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        config = cls()
        for key, value in _flatten(values).items():
            _set(config, key, value, source)
        return config


# The paper's ablation ladder (METHOD.md), each rung a change of the fields named here.
ABLATION_VARIANTS: dict[str, dict[str, Any]] = {
    "clip": {"captions.k": 0, "loss.group_weight": 0.0},
    "long-whole": {"captions.k": 1, "captions.long_mode": "whole", "captions.use_short": False, "loss.group_weight": 0.0},
    "subcaptions": {"captions.long_mode": "sentences", "captions.use_short": False, "loss.group_weight": 0.0},
    "short": {"captions.long_mode": "sentences", "captions.use_short": True, "loss.group_weight": 0.0},
    "dreamlip": {"captions.long_mode": "sentences", "captions.use_short": True, "loss.group_weight": 1.0},
}


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files("dreamlip").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


def load_config(preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then a named preset or a YAML file, then ``key=value`` overrides, in that order."""
    config = TrainConfig()
    if preset is not None:
        path = resources.files("dreamlip").joinpath("configs", f"{preset}.yaml")
        if not path.is_file():
            raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(list_presets())}")
        _update(config, yaml.safe_load(path.read_text()) or {}, f"preset {preset}")
    if config_file is not None:
        _update(config, yaml.safe_load(Path(config_file).read_text()) or {}, str(config_file))
    return apply_overrides(config, overrides)


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.field=value`` strings; values are parsed as YAML (``1e-3``, ``null``, ``true``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        _set(config, key.strip(), yaml.safe_load(raw), "--set")
    return config


def apply_variant(config: TrainConfig, variant: str) -> TrainConfig:
    """Switch ``config`` to one rung of the ablation ladder (``ABLATION_VARIANTS``)."""
    if variant not in ABLATION_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(ABLATION_VARIANTS)}")
    for key, value in ABLATION_VARIANTS[variant].items():
        _set(config, key, value, f"variant {variant}")
    return config


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _update(config: TrainConfig, values: dict[str, Any], source: str) -> None:
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    for key, value in _flatten(values).items():
        _set(config, key, value, source)


def _set(config: TrainConfig, key: str, value: Any, source: str) -> None:
    section_name, _, field_name = key.partition(".")
    section = getattr(config, section_name, None)
    if not dataclasses.is_dataclass(section) or not field_name:
        sections = ", ".join(f.name for f in dataclasses.fields(config))
        raise ValueError(f"{source}: unknown key {key!r}; keys look like SECTION.FIELD with SECTION in {sections}")
    fields = {f.name: f for f in dataclasses.fields(section)}
    if field_name not in fields:
        raise ValueError(f"{source}: unknown key {key!r}; {section_name} has {', '.join(fields)}")
    current = getattr(section, field_name)
    # Coerce YAML's ints to float fields and reject obviously wrong types early.
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string.
        try:
            value = float(value) if isinstance(current, float) else int(value)
        except ValueError:
            raise ValueError(f"{source}: {key} must be a number, got {value!r}") from None
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(current, (int, float)) and not isinstance(current, bool) and not isinstance(value, (int, float)):
        raise ValueError(f"{source}: {key} must be a number, got {value!r}")
    setattr(section, field_name, value)
