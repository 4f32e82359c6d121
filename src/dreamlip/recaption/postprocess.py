"""Clean generated captions before the trainer splits them into sub-captions.

DreamLIP turns every sentence of a long caption into a positive text for its image, so a sentence
that carries no content ("The image shows ...", a repeated line from a greedy decoding loop, a
sentence cut off by the token limit) becomes a noisy positive. The raw text is kept next to the
cleaned one by the caller, so nothing is lost.
"""

from __future__ import annotations

import re

from dreamlip.captions import has_word, split_sentences

__all__ = ["clean_caption"]

# Generic words only: "This painting depicts ..." says what kind of image it is, so it stays.
_MEDIUM = r"(?:image|picture|photo|photograph|scene)"
_VERB = (
    r"(?:shows|depicts|features|displays|presents|captures|portrays|showcases|illustrates|contains|"
    r"highlights|reveals)"
)
# Openers that describe the act of looking rather than the image, removed at the start of a sentence;
# a sentence that is nothing but an opener ("Here is a description of the image.") is dropped.
_OPENERS = [
    # "Sure! Here is a detailed description of the image:"
    r"(?:(?:sure|certainly|of course)[,.!]?\s*)?(?:here\s+is|here's)\s+[^.:]*?description[^.:]*[:.]\s*",
    # "The image shows", "This photo also depicts", "The image is showing"
    rf"(?:the|this)\s+{_MEDIUM}\s+(?:also\s+)?(?:{_VERB}|is\s+(?:showing|depicting|of))\b\s*",
    # "In the image, we can see", "In this picture there is" (the "there is" stays: it is content)
    rf"in\s+(?:the|this)\s+{_MEDIUM}\s*,?\s*(?:(?:we|you|i)\s+can\s+see\s+)?",
    # "This is an image of", "It is a photo showing"
    rf"(?:this|it)\s+is\s+(?:an?\s+)?(?:close-up\s+)?{_MEDIUM}\s+(?:of|showing|depicting)\s+",
    # "An image of", "A photo showing"
    rf"an?\s+{_MEDIUM}\s+(?:of|showing|depicting)\s+",
    r"(?:we|you|i)\s+can\s+see\s+",
]
_OPENER = re.compile(rf"^(?:{'|'.join(_OPENERS)})", re.IGNORECASE)
# A whole sentence of chat filler ("Sure!") says nothing about the image.
_FILLER = re.compile(r"^(?:sure|certainly|of course|okay|ok)\W*$", re.IGNORECASE)
_TERMINAL = re.compile(r"[.!?][\"')\]]*$")


def _strip_opener(sentence: str) -> str:
    stripped = _OPENER.sub("", sentence, count=1).lstrip(" ,:;-")
    if not has_word(stripped):
        return ""
    if stripped == sentence:
        return sentence
    return stripped[0].upper() + stripped[1:]


def _normalised(sentence: str) -> str:
    return " ".join(sentence.lower().split())


def clean_caption(text: str, *, truncated: bool = False) -> str:
    """Return ``text`` with boilerplate openers and filler stripped and exact repeats dropped.

    Sentences come from :func:`dreamlip.captions.split_sentences` and are joined with single
    spaces. ``truncated`` says generation stopped at the token limit: a last sentence without
    closing punctuation is then a fragment and is dropped, even when it is the only one (a cut-off
    caption is never stored; the caller records the empty result as a failure).
    """
    sentences = split_sentences(text)
    if truncated and sentences and not _TERMINAL.search(sentences[-1]):
        sentences = sentences[:-1]
    seen: set[str] = set()
    kept: list[str] = []
    for sentence in sentences:
        if _FILLER.match(sentence):
            continue
        sentence = _strip_opener(sentence)
        key = _normalised(sentence)
        if sentence and key not in seen:
            seen.add(key)
            kept.append(sentence)
    return " ".join(kept)
