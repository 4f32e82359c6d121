"""DreamLIP: language-image pre-training with long captions."""

__version__ = "0.1.0"
