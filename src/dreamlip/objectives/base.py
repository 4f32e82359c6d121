"""What every objective is: an ``nn.Module`` with its own parameters that declares the model outputs
it needs and returns its loss as a dict of named terms; and the registry that builds one from the
config's ``loss`` section.

The trainer knows nothing else about an objective: it asks the model for ``objective.needs``,
calls ``objective(outputs, step)``, sums the terms it gets back and logs each by name. See
docs/method.md, "Adding an objective".
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "OBJECTIVES",
    "ModelNeeds",
    "Objective",
    "Outputs",
    "ViewNeeds",
    "build_objective",
    "loss_config_class",
    "objective_names",
    "register",
]

# The model outputs an objective reads, by name (see ModelNeeds and DreamLIPModel.forward):
#   image_emb [B, D], text_emb [B, T, D]                     always, normalised
#   patch_emb [B, N, D]                                      needs.patches
#   token_emb [B, T, L, D], token_mask [B, T, L]             needs.tokens
#   logit_scale (0-d, the model's own temperature, a log)   always; trained only when needs.logit_scale
# B is the whole step's batch on this rank (every micro-batch of it); the other ranks' are the
# objective's to gather.
Outputs = Mapping[str, torch.Tensor | None]


@dataclass(frozen=True)
class ModelNeeds:
    """Which model outputs an objective reads besides the global image and text embeddings."""

    patches: bool = False  # projected, normalised patch tokens (a ViT without attentional pooling)
    tokens: bool = False  # every text position's projected, normalised embedding and the content-token mask
    logit_scale: bool = True  # the model's temperature (clip.logit_scale); frozen when False
    # False: the patch tokens pass the projection they share with the class token as a constant, so
    # this objective's gradient through them moves the trunk but not the global embedding's projection
    patch_projection_grad: bool = True


@dataclass(frozen=True)
class ViewNeeds:
    """Several views of each sample (COSMOS's multi-crop and text crops, :mod:`dreamlip.views`): the
    loader builds them only for an objective that declares this. A batch then has ``images`` [B, 2,
    3, S, S] (the global crops), ``local_images`` [B, local_crops, 3, s, s] and ``texts`` [B, K + 1,
    L] text crops (2 global captions, then local ones), and the objective encodes them itself
    (:meth:`Objective.encode_views`)."""

    local_crops: int = 6
    crop_scale: float = 0.4  # global crops cover crop_scale..1 of the image, local ones 0.05..crop_scale


class Objective(nn.Module):
    """A training objective. Subclasses set ``name`` and ``Config`` (a dataclass of their ``loss.*``
    fields, with defaults) and implement ``from_config`` and ``forward``.

    ``forward(outputs, step)`` returns the loss as named terms, each already weighted: the loss is
    their sum, and each is logged on its own (``loss/<name>``). A term may be left out on a step
    where it does not apply (a grouping term without two sub-captions). ``step`` is the number of
    optimizer steps done before this one, for terms whose weight follows a schedule.

    Parameters an objective owns (temperatures, biases, poolers) are trained with the model,
    checkpointed beside it (``"objective"``) and restored on resume; a parameter it does not use
    under its settings must be frozen (``requires_grad_(False)``), or DDP refuses the step.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    needs: ModelNeeds
    # The model temperature's start (log) in a run from scratch, where it is not CLIP's 1/0.07 (SigLIP's 10).
    model_logit_scale_init: float | None = None
    # What to change when the model cannot give what ``needs`` asks (patch tokens of a ViT), if anything.
    needs_hint: ClassVar[str] = ""
    # Several views per sample, built by the loader; None: one image and K + 1 sub-captions (today's cost).
    views: ViewNeeds | None = None

    @classmethod
    def from_config(cls, config: Any, text_slots: int, embed_dim: int, global_batch: int | None = None) -> Objective:
        """Built from the ``loss`` section (its ``Config`` fields are attributes of ``config``);
        ``text_slots`` is the texts per image (``captions.k + 1``), ``embed_dim`` the width of the
        model's joint embedding space (for a pooler), ``global_batch`` the images one optimizer step
        scores against each other (every rank's, every micro-batch's; None for a model loaded from a
        checkpoint, whose parameters replace whatever it starts from)."""
        raise NotImplementedError

    def forward(self, outputs: Outputs, step: int = 0) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def bind(self, model: nn.Module) -> None:
        """Called once the model to train exists with its starting weights, before a checkpoint
        restores both: for state made from the model (an EMA teacher's starting copy)."""

    def check_strategy(self, sharded: bool) -> None:
        """Raise ``ValueError`` saying why if this objective cannot train under the strategy."""

    def encode_views(self, model: nn.Module, images: torch.Tensor, local_images: torch.Tensor, texts: torch.Tensor) -> Outputs:
        """The outputs ``forward`` reads, from a batch of views (objectives that declare ``views``)."""
        raise NotImplementedError(f"the {self.name} objective declares views but does not encode them")

    def set_run_length(self, total_steps: int) -> None:
        """Called by the trainer once the run's length in optimizer steps is known, before the
        first step: for terms whose schedule spans the run."""

    def after_backward(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called once per optimizer step, after its gradients and before the update, on every rank
        alike: state the objective follows without gradients (an EMA teacher)."""

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        """Called after every optimizer step: keep the parameters in their range."""

    def scalars(self) -> dict[str, float]:
        """Parameters worth logging each step (temperatures as their inverse, biases)."""
        return {}

    def open_clip_state(self) -> dict[str, torch.Tensor]:
        """Entries of the open_clip model's state dict that this objective's trained parameters
        define (SigLIP's ``logit_bias``): what an export and an evaluation use. Detached views of
        the parameters, not copies: :meth:`start_from_open_clip` writes through them."""
        return {}

    @torch.no_grad()
    def start_from_open_clip(self, clip: nn.Module) -> None:
        """Fine-tuning from open_clip weights: take the entries of :meth:`open_clip_state` that the
        pretrained model holds (an open_clip SigLIP's trained ``logit_bias``), so training goes on
        from them instead of this objective's fresh start."""
        held = dict(clip.named_parameters())
        for name, own in self.open_clip_state().items():
            if name in held and held[name].numel() == own.numel():
                own.copy_(held[name].reshape(own.shape))

    @property
    def conditioned_pooler(self) -> nn.Module | None:
        """A module that pools an image's patch tokens with a text as the query,
        ``(queries [B, Q, D], patches [B, N, D]) -> [B, Q, D]`` (FLAIR's), for evaluation by
        text-conditioned image embeddings; None when the objective has none."""
        return None


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` choosable as ``loss.objective=<cls.name>``."""
    if cls.name in OBJECTIVES:
        raise ValueError(f"an objective named {cls.name!r} is already registered")
    OBJECTIVES[cls.name] = cls
    return cls


def _fields(cls: type[Objective]) -> dict[str, tuple[Any, Any]]:
    hints = typing.get_type_hints(cls.Config)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(cls.Config)}


def objective_names(objective: str, where: str = "loss.objective") -> list[str]:
    """The registered objectives ``objective`` names: one name, or several joined by ``+`` (a
    combination, :class:`dreamlip.objectives.Combination`); a ValueError naming ``where`` otherwise."""
    names = [name.strip() for name in str(objective).split("+")]
    if not all(name in OBJECTIVES for name in names) or len(set(names)) != len(names):
        raise ValueError(
            f"{where} must be one of {', '.join(OBJECTIVES)}, or several of them joined by '+' "
            f"(each once, e.g. flair+dreamlip); got {objective!r}"
        )
    return names


def loss_config_class() -> type:
    """The ``loss`` section's dataclass: ``objective`` (a registered name, or several joined by
    ``+``), ``objective_weights`` (a combination's weights, one per name) and every registered
    objective's fields. A field two objectives share must have the same type and default."""
    fields: dict[str, tuple[Any, Any]] = {}
    for name, cls in OBJECTIVES.items():
        for field_name, spec in _fields(cls).items():
            if fields.setdefault(field_name, spec) != spec:
                raise TypeError(f"loss.{field_name}: {name} declares {spec}, another objective {fields[field_name]}")
    specs = [
        ("objective", str, dataclasses.field(default="dreamlip")),
        ("objective_weights", list[float], dataclasses.field(default_factory=list)),  # empty: 1 each
    ]
    specs += [(name, kind, dataclasses.field(default=default)) for name, (kind, default) in fields.items()]
    config = dataclasses.make_dataclass("LossConfig", specs)
    config.__module__ = "dreamlip.objectives"  # where it is exported: pickles and reprs name it there
    return config


def build_objective(config: Any, text_slots: int, embed_dim: int, global_batch: int | None = None) -> Objective:
    """The objective ``config.objective`` names, from the ``loss`` section ``config``: one
    registered objective, or a :class:`~dreamlip.objectives.Combination` of several. A field set
    away from its default that no chosen objective reads is refused: it would do nothing.
    ``global_batch``: see :meth:`Objective.from_config`."""
    names = objective_names(config.objective)
    weights = list(config.objective_weights)
    if len(names) == 1 and weights:
        raise ValueError(f"loss.objective_weights={weights}: weights a combination's objectives (e.g. flair+dreamlip), not one")
    if len(names) > 1 and weights and len(weights) != len(names):
        raise ValueError(f"loss.objective_weights={weights}: one weight per objective of {config.objective}, {len(names)}")
    own = {field: spec for name in names for field, spec in _fields(OBJECTIVES[name]).items()}
    unread = [
        f"loss.{f.name}={getattr(config, f.name)!r}"
        for f in dataclasses.fields(config)
        if f.name not in ("objective", "objective_weights") and f.name not in own and getattr(config, f.name) != f.default
    ]
    if unread:
        raise ValueError(
            f"{', '.join(unread)}: not a field of the {config.objective} objective, which reads "
            f"{', '.join(f'loss.{name}' for name in own) or 'no loss field'}"
        )
    parts = [OBJECTIVES[name].from_config(config, text_slots, embed_dim, global_batch) for name in names]
    if len(parts) == 1:
        return parts[0]
    from .combination import Combination

    return Combination(parts, weights or [1.0] * len(parts))
