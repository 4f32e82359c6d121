"""The embedded synthetic long-caption dataset (``dreamlip demo-data``, docs/demo-data.md).

A generator for the demo and the ablation ladder, not a data reader: what it writes is read by
:mod:`dreamlip.data` and :mod:`dreamlip.eval` like any other dataset. :mod:`.scenes` draws the
images and masks, :mod:`.text` writes the captions, :mod:`.writer` writes any kind of demo set to
disk. :func:`generator` names every kind ``dreamlip demo-data --kind`` renders.
"""

from typing import Callable

from .scenes import GENERATOR_VERSION, classes_spec, generate, make_record, render_scene

__all__ = ["DATA_KINDS", "GENERATOR_VERSION", "classes_spec", "generate", "generator", "make_record", "render_scene"]

# "synthetic": procedural shapes (this package); "real": real photos and scans composited
# (dreamlip.realset, docs/real-data.md). Each generator takes the same arguments.
DATA_KINDS = ("synthetic", "real")


def generator(kind: str) -> Callable[..., dict]:
    """The ``generate`` function of a demo-data kind."""
    if kind == "synthetic":
        return generate
    if kind == "real":  # imported on demand: it reads its source images from other packages
        from dreamlip.realset import generate as generate_real

        return generate_real
    raise ValueError(f"unknown demo-data kind {kind!r}; choices: {', '.join(DATA_KINDS)}")
