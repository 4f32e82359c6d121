"""Training objectives, one module each, chosen by ``loss.objective``.

An objective (:class:`Objective`) is an ``nn.Module`` with its own parameters that declares the
model outputs it needs (:class:`ModelNeeds`) and returns its loss as a dict of named, weighted
terms; :func:`build_objective` makes the one the config's ``loss`` section names, whose fields
(:data:`LossConfig`) are every registered objective's ``Config`` fields; ``loss.objective=flair+dreamlip`` combines several
(:class:`Combination`). docs/method.md, "Adding an objective", says how to add one.
"""

from .base import OBJECTIVES, ModelNeeds, Objective, Outputs, build_objective, loss_config_class, objective_names, register
from .combination import Combination
from .dreamlip import DreamLIPObjective
from .flair import FLAIRObjective, TextConditionedPooler
from .siglip import SigLIPObjective

__all__ = [
    "OBJECTIVES",
    "Combination",
    "DreamLIPObjective",
    "FLAIRObjective",
    "LossConfig",
    "ModelNeeds",
    "Objective",
    "Outputs",
    "SigLIPObjective",
    "TextConditionedPooler",
    "build_objective",
    "objective_names",
    "register",
]

# After every objective module above has registered itself.
LossConfig = loss_config_class()
