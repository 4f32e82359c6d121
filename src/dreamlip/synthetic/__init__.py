"""The embedded synthetic long-caption dataset (``dreamlip demo-data``, docs/demo-data.md).

A generator for the demo and the ablation ladder, not a data reader: what it writes is read by
:mod:`dreamlip.data` and :mod:`dreamlip.eval` like any other dataset. :mod:`.scenes` draws the
images and masks, :mod:`.text` writes the captions.
"""

from .scenes import GENERATOR_VERSION, classes_spec, generate, make_record, render_scene

__all__ = ["GENERATOR_VERSION", "classes_spec", "generate", "make_record", "render_scene"]
