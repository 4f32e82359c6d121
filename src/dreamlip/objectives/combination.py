"""Several objectives trained together, each term weighted: ``loss.objective=flair+dreamlip``
with ``loss.objective_weights=1,0.5`` (docs/method.md, "Combining objectives")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import ModelNeeds, Objective, Outputs

__all__ = ["Combination"]


class Combination(Objective):
    """The weighted sum of its parts' losses. Each part reads its own ``loss.*`` fields and owns its
    parameters (``parts.<name>.*`` in the state dict, so checkpoints and resumes carry each); its
    terms are logged as ``<name>/<term>`` (``loss/dreamlip/group``), each times the part's weight.

    The model is asked for what any part needs, and its temperature trains when any part reads it.
    Where parts disagree, the first named wins: the start of the model's temperature (the first part
    that sets one: SigLIP's 10 in ``flair+siglip``), the open_clip state an export writes (one
    ``logit_bias``), and the pooler evaluation conditions on.

    One part may train on several views per sample (COSMOS's): it encodes the batch, its outputs
    carry the one-view outputs the other parts read (its first global view and the text crops), and
    its hooks (teacher, strategy) run as alone. Parts that read text tokens do not combine with it.
    """

    def __init__(self, parts: Sequence[Objective], weights: Sequence[float]):
        super().__init__()
        if len(parts) < 2 or len(weights) != len(parts):
            raise ValueError(f"a combination takes two or more objectives and one weight each, got {len(parts)} and {len(weights)}")
        self.name = "+".join(part.name for part in parts)
        with_views = [part for part in parts if part.views is not None]
        if len(with_views) > 1:
            raise ValueError(f"{self.name}: {', '.join(p.name for p in with_views)} each build their own views; one part at most may")
        with_tokens = [part.name for part in parts if part.needs.tokens]
        if with_views and with_tokens:
            raise ValueError(
                f"{self.name}: {', '.join(with_tokens)} reads text tokens, which {with_views[0].name}'s views do not carry"
            )
        self.views = with_views[0].views if with_views else None
        self._encoder = with_views[0].name if with_views else None  # a name: the part is registered once, in parts
        self.parts = nn.ModuleDict({part.name: part for part in parts})
        self.weights = [float(weight) for weight in weights]
        # The patch tokens are computed once for every part: whether their gradient moves the projection
        # the class token shares must be one answer.
        projection_grads = {part.needs.patch_projection_grad for part in parts if part.needs.patches}
        if len(projection_grads) > 1:
            raise ValueError(
                f"{self.name}: the parts that read patch tokens disagree on patch_projection_grad "
                "(loss.group_projection_grad=false): the patch tokens are one computation for every part"
            )
        self.needs = ModelNeeds(
            patches=any(part.needs.patches for part in parts),
            tokens=any(part.needs.tokens for part in parts),
            logit_scale=any(part.needs.logit_scale for part in parts),
            patch_projection_grad=projection_grads.pop() if projection_grads else True,
        )
        self.model_logit_scale_init = next((p.model_logit_scale_init for p in parts if p.model_logit_scale_init is not None), None)
        self.needs_hint = "; ".join(f"{part.name}: {part.needs_hint}" for part in parts if part.needs.patches and part.needs_hint)

    def forward(self, outputs: Outputs, step: int = 0) -> dict[str, torch.Tensor]:
        return {
            f"{name}/{term}": weight * value
            for (name, part), weight in zip(self.parts.items(), self.weights, strict=True)
            for term, value in part(outputs, step).items()
        }

    def encode_views(self, model: nn.Module, images: torch.Tensor, local_images: torch.Tensor, texts: torch.Tensor) -> Outputs:
        if self._encoder is None:
            return super().encode_views(model, images, local_images, texts)
        return self.parts[self._encoder].encode_views(model, images, local_images, texts)

    def bind(self, model: nn.Module) -> None:
        for part in self.parts.values():
            part.bind(model)

    def check_strategy(self, sharded: bool) -> None:
        for part in self.parts.values():
            part.check_strategy(sharded)

    def after_backward(self, model: nn.Module, step: int, total_steps: int) -> None:
        for part in self.parts.values():
            part.after_backward(model, step, total_steps)

    def set_run_length(self, total_steps: int) -> None:
        for part in self.parts.values():
            part.set_run_length(total_steps)

    @torch.no_grad()
    def clamp_parameters(self) -> None:
        for part in self.parts.values():
            part.clamp_parameters()

    def scalars(self) -> dict[str, float]:
        return {f"{name}/{key}": value for name, part in self.parts.items() for key, value in part.scalars().items()}

    def open_clip_state(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for part in reversed(self.parts.values()):
            state.update(part.open_clip_state())
        return state

    @property
    def conditioned_pooler(self) -> nn.Module | None:
        return next((part.conditioned_pooler for part in self.parts.values() if part.conditioned_pooler is not None), None)
