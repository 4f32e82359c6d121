"""Recaptioning: add long and short captions from a multimodal LLM to an image-text dataset.

The step DreamLIP's authors never released: images in (our JSONL, a folder, webdataset shards),
the same kind out with ``captions.<captioner>.short/long`` added to every record. Backends:
a local transformers model, any OpenAI-compatible server, or vLLM's offline engine.
"""

from .backends import (
    BackendError,
    Captioner,
    Generation,
    OpenAIBackend,
    Request,
    TransformersBackend,
    VLLMBackend,
)
from .postprocess import clean_caption
from .runner import (
    DEFAULT_PROMPT_LONG,
    DEFAULT_PROMPT_SHORT,
    RecaptionConfig,
    Unfinished,
    apply_result,
    merge,
    recaption,
    shard_units,
)
from .sources import InputError, Source, open_input
from .store import ManifestMismatch, WorkDir

__all__ = [
    "DEFAULT_PROMPT_LONG",
    "DEFAULT_PROMPT_SHORT",
    "BackendError",
    "Captioner",
    "Generation",
    "InputError",
    "ManifestMismatch",
    "OpenAIBackend",
    "RecaptionConfig",
    "Request",
    "Source",
    "TransformersBackend",
    "Unfinished",
    "VLLMBackend",
    "WorkDir",
    "apply_result",
    "clean_caption",
    "merge",
    "open_input",
    "recaption",
    "shard_units",
]
