"""The real-image development set (``dreamlip demo-data --kind real``, docs/real-data.md).

A generator like :mod:`dreamlip.synthetic`, with the same layout and record schema, whose pixels
are real: object cut-outs from photographs and scans shipped inside scikit-image's and
scikit-learn's wheels (:mod:`.sources`), pasted onto real background photos and textures
(:mod:`.scenes`), with web-like alt-text, imperfect captioners and held-out test wording
(:mod:`.text`).
"""

from .scenes import GENERATOR_VERSION, classes_spec, generate, make_record

__all__ = ["GENERATOR_VERSION", "classes_spec", "generate", "make_record"]
