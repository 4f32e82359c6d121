"""Text side of the embedded synthetic dataset: the vocabulary, three simulated captioners, the
alt-text ("raw caption") writer and the held-out "human" test style.

Training text (raw captions + the captioners' short and long captions) and test text (the human
retrieval captions, zero-shot classification prompts, segmentation class names) share *words* but
not *sentence templates*:

- Every attribute value has several surface forms (``"big"``/``"large"``/``"huge"``,
  ``"spotted"``/``"dotted"``, ``"upper left"``/``"top-left"``). Each captioner prefers its own
  forms, and between them every form occurs in training, so a synonym the test uses is learnable
  from some captioner's wording.
- The human style draws forms from all of them but uses sentence frames no training text uses.
  :func:`skeleton` reduces a sentence to its frame (attribute words replaced by ``#``); the test
  suite checks that no test frame is a training frame and that every content word of the test
  text occurs in training text.

Captioners see a *perceived* scene, not the true one: they miss objects, get attributes or
positions wrong and sometimes hallucinate an object (rates in :data:`CAPTIONERS`). Alt-text names
at most one object, often without attributes, sometimes with a wrong one, and sometimes nothing
but junk words. Human test captions are correct.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Canonical attribute values (order = class index)
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart"]
COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
SIZES = ["small", "medium", "large"]
TEXTURES = ["solid", "striped", "dotted"]
POSITIONS = [
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
]  # row-major 3x3 grid over the image
BG_KINDS = ["plain", "gradient", "checkered", "cloudy"]
BG_TONES = ["light", "dark"]
RELATIONS = ["left of", "right of", "above", "below"]

# Surface forms. Captioner IB prefers form 0, LLA forms 1/0, SV forms 2+/1 (see pick_form); the
# human test style draws from all of them. Every form is therefore produced by some captioner.
SHAPE_FORMS = {
    "circle": ["circle", "circle", "disk"],
    "square": ["square"],
    "triangle": ["triangle"],
    "diamond": ["diamond", "diamond", "rhombus"],
    "star": ["star", "star", "five-pointed star"],
    "cross": ["cross", "plus sign", "cross"],
    "ring": ["ring", "ring", "hoop", "donut"],
    "heart": ["heart"],
}
COLOR_FORMS = {
    "red": ["red"],
    "orange": ["orange"],
    "yellow": ["yellow"],
    "green": ["green"],
    "cyan": ["cyan", "cyan", "turquoise"],
    "blue": ["blue"],
    "purple": ["purple", "purple", "violet"],
    "pink": ["pink"],
}
SIZE_FORMS = {
    "small": ["small", "small", "little", "tiny"],
    "medium": ["medium", "medium-sized", "mid-sized"],
    "large": ["large", "big", "large", "huge"],
}
TEXTURE_ADJ = {
    "solid": ["solid", "solid-colored", "filled"],
    "striped": ["striped", "striped", "stripy", "lined"],
    "dotted": ["dotted", "dotted", "spotted", "polka-dot"],
}
TEXTURE_WITH = {
    "solid": ["with a solid fill", "with no pattern", "filled with a single flat color"],
    "striped": ["with stripes", "with a striped pattern", "covered in stripes"],
    "dotted": ["with dots", "with a dotted pattern", "covered in spots", "with spots"],
}
BG_KIND_FORMS = {
    "plain": ["plain", "plain", "uniform", "flat"],
    "gradient": ["gradient", "gradient", "smoothly shaded"],
    "checkered": ["checkered", "checkerboard", "chequered"],
    "cloudy": ["cloudy", "mottled", "blotchy"],
}
BG_TONE_FORMS = {
    "light": ["light", "light", "pale", "bright"],
    "dark": ["dark", "dark", "deep", "dim"],
}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
JUNK = [
    "free",
    "download",
    "hd",
    "wallpaper",
    "stock",
    "vector",
    "clipart",
    "icon",
    "png",
    "logo",
    "design",
    "art",
    "cute",
    "cool",
    "new",
    "best",
    "sale",
    "template",
    "sticker",
    "emoji",
    "cartoon",
    "graphic",
    "symbol",
    "print",
    "jpg",
    "img",
    "royalty",
    "shirt",
    "poster",
    "card",
]

# Words treated as attribute slots when reducing a sentence to its frame (see skeleton()).
DIRECTION_WORDS = {
    "left",
    "right",
    "top",
    "bottom",
    "upper",
    "lower",
    "middle",
    "center",
    "centre",
    "central",
    "above",
    "below",
    "over",
    "under",
    "beneath",
    "higher",
    "next",
    "edge",
    "corner",
    "side",
}
FUNCTION_WORDS = {
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "to",
    "and",
    "with",
    "is",
    "are",
    "there",
    "it",
    "its",
    "this",
    "that",
    "these",
    "those",
    "as",
    "by",
    "for",
    "from",
    "be",
    "been",
    "has",
    "have",
    "can",
    "some",
    "no",
    "one",
    "each",
    "into",
    "or",
    "but",
    "than",
    "just",
    "very",
}


def lower_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _all_forms() -> list[str]:
    out: list[str] = []
    for table in (
        SHAPE_FORMS,
        COLOR_FORMS,
        SIZE_FORMS,
        TEXTURE_ADJ,
        TEXTURE_WITH,
        BG_KIND_FORMS,
        BG_TONE_FORMS,
    ):
        for forms in table.values():
            out.extend(forms)
    out.extend(COUNT_WORDS.values())
    return out


SLOT_WORDS = (
    frozenset(w for form in _all_forms() for w in lower_words(form) if w not in FUNCTION_WORDS)
    | DIRECTION_WORDS
    | {"shape", "shapes", "figure", "figures"}
)


def skeleton(text: str, slot_words: frozenset[str] = SLOT_WORDS) -> str:
    """The sentence frame: lowercase words, attribute/direction words (``slot_words``, by default
    this set's) replaced by ``#`` (runs collapsed), punctuation dropped. Two sentences with the
    same skeleton use the same template."""
    out: list[str] = []
    for w in lower_words(text):
        tok = "#" if w in slot_words or w.isdigit() else w
        if tok == "#" and out and out[-1] == "#":
            continue
        out.append(tok)
    return " ".join(out)


def content_words(text: str) -> set[str]:
    """Words of ``text`` that carry meaning (everything but a short list of function words)."""
    return {w for w in lower_words(text) if w not in FUNCTION_WORDS and not w.isdigit()}


# --------------------------------------------------------------------------------------------
# Scene description shared with the renderer


@dataclass(frozen=True)
class ObjectDesc:
    shape: str
    color: str
    size: str
    texture: str
    position: str
    cx: float = 0.0  # centre in pixels (relations are computed from these)
    cy: float = 0.0
    area: int = 0  # visible pixels
    hallucinated: bool = False


@dataclass(frozen=True)
class SceneDesc:
    objects: tuple[ObjectDesc, ...]  # drawing order (back to front)
    bg_kind: str
    bg_tone: str
    image_size: int
    noun: ClassVar[str] = "shape"  # what the held-out captions call an object

    @property
    def by_area(self) -> list[ObjectDesc]:
        return sorted(self.objects, key=lambda o: -o.area)


def relation(a: ObjectDesc, b: ObjectDesc, image_size: int) -> str | None:
    """Where ``a`` is relative to ``b`` ("left of", "right of", "above", "below"), or None when
    the centres are too close to say."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if max(abs(dx), abs(dy)) < 0.18 * image_size:
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


# --------------------------------------------------------------------------------------------
# Captioners


@dataclass(frozen=True)
class CaptionerSpec:
    name: str
    p_miss: float  # per non-main object: left out of the description
    p_wrong: float  # per stated attribute (colour, size, texture): a wrong value
    p_wrong_pos: float  # per object: a neighbouring position
    p_hallucinate: float  # per image: an extra object that is not there


CAPTIONERS: dict[str, CaptionerSpec] = {
    # InstructBLIP-like: terse, plain wording, misses the most.
    "IB": CaptionerSpec("IB", p_miss=0.15, p_wrong=0.08, p_wrong_pos=0.05, p_hallucinate=0.02),
    # LLaVA-like: "The image shows ...", "In the ... of the image, there is ...".
    "LLA": CaptionerSpec("LLA", p_miss=0.10, p_wrong=0.06, p_wrong_pos=0.05, p_hallucinate=0.05),
    # ShareGPT4V-like: verbose, ornate, most complete.
    "SV": CaptionerSpec("SV", p_miss=0.06, p_wrong=0.05, p_wrong_pos=0.03, p_hallucinate=0.04),
}
_STYLE_PREF = {"IB": ((0,), (1.0,)), "LLA": ((1, 0), (0.7, 0.3)), "SV": ((2, 1), (0.7, 0.3))}


def pick_form(forms: Sequence[str], style: str, rng: np.random.Generator) -> str:
    """A captioner's choice among surface forms; SV also uses forms 3+ when a list has them."""
    if style == "human":
        return forms[int(rng.integers(len(forms)))]
    if len(forms) == 1:
        return forms[0]
    idx, weights = _STYLE_PREF[style]
    if style == "SV" and len(forms) > 3:
        idx, weights = (2, 3, 1), (0.4, 0.4, 0.2)
    r = rng.random()
    for i, w in zip(idx, weights):
        r -= w
        if r < 0:
            break
    return forms[min(i, len(forms) - 1)]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


NEIGHBOURS = {
    p: [
        q
        for q in POSITIONS
        if abs(POSITIONS.index(q) // 3 - POSITIONS.index(p) // 3)
        + abs(POSITIONS.index(q) % 3 - POSITIONS.index(p) % 3)
        == 1
    ]
    for p in POSITIONS
}


def perceive(scene: SceneDesc, spec: CaptionerSpec, rng: np.random.Generator) -> list[ObjectDesc]:
    """What a captioner 'sees': objects largest first, with misses, wrong attributes, wrong
    positions and an occasional hallucinated object."""
    seen: list[ObjectDesc] = []
    for rank, obj in enumerate(scene.by_area):
        if rank > 0 and rng.random() < spec.p_miss:
            continue
        changes = {}
        for attr, values in (("color", COLORS), ("size", SIZES), ("texture", TEXTURES)):
            if rng.random() < spec.p_wrong:
                others = [v for v in values if v != getattr(obj, attr)]
                changes[attr] = others[int(rng.integers(len(others)))]
        if rng.random() < spec.p_wrong_pos:
            nb = NEIGHBOURS[obj.position]
            changes["position"] = nb[int(rng.integers(len(nb)))]
        seen.append(replace(obj, **changes))
    if rng.random() < spec.p_hallucinate:
        used = {o.shape for o in scene.objects}
        free_shapes = [s for s in SHAPES if s not in used]
        free_pos = [p for p in POSITIONS if p not in {o.position for o in scene.objects}]
        if free_shapes and free_pos:
            seen.append(
                ObjectDesc(
                    shape=free_shapes[int(rng.integers(len(free_shapes)))],
                    color=COLORS[int(rng.integers(len(COLORS)))],
                    size="small",
                    texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
                    position=free_pos[int(rng.integers(len(free_pos)))],
                    hallucinated=True,
                )
            )
    return seen


def relation_pairs(objs: Sequence[ObjectDesc], size: int, rng: np.random.Generator):
    pairs = []
    real = [o for o in objs if not o.hallucinated]
    for i in range(len(real)):
        for j in range(i + 1, len(real)):
            a, b = (real[i], real[j]) if rng.random() < 0.5 else (real[j], real[i])
            rel = relation(a, b, size)
            if rel is not None:
                pairs.append((a, b, rel))
    order = rng.permutation(len(pairs))
    return [pairs[k] for k in order]


# ---- per-style phrase builders -----------------------------------------------------------


def position_phrase(pos: str, style: str, rng: np.random.Generator) -> str:
    row, col = divmod(POSITIONS.index(pos), 3)
    vert = {0: ("top", "upper"), 2: ("bottom", "lower")}.get(row)
    horiz = {0: "left", 2: "right"}.get(col)
    if style == "IB":
        if vert and horiz:
            return f"at the {vert[0]} {horiz}"
        if vert:
            return f"at the {vert[0]}"
        if horiz:
            return f"on the {horiz}"
        return "in the center"
    if style == "LLA":
        if vert and horiz:
            v = vert[1] if rng.random() < 0.7 else vert[0]
            return f"in the {v} {horiz} corner of the image"
        if vert:
            return (
                f"in the {vert[1]} part of the image"
                if rng.random() < 0.5
                else f"at the {vert[0]} of the image"
            )
        if horiz:
            return f"on the {horiz} side of the image"
        return "in the middle of the image" if rng.random() < 0.6 else "in the center of the image"
    if style == "SV":
        if vert and horiz:
            v = vert[0] if rng.random() < 0.6 else vert[1]
            return f"in the {v}-{horiz} region" if rng.random() < 0.5 else f"in the {v}-{horiz} corner"
        if vert:
            return f"near the {vert[0]} edge" if rng.random() < 0.6 else f"along the {vert[1]} edge"
        if horiz:
            return f"on the {horiz}-hand side" if rng.random() < 0.5 else f"near the {horiz} edge"
        return "at the very centre" if rng.random() < 0.5 else "in the central area"
    raise ValueError(style)


def relation_phrase(rel: str, style: str, rng: np.random.Generator) -> str:
    table = {
        "IB": {
            "left of": ["to the left of"],
            "right of": ["to the right of"],
            "above": ["above"],
            "below": ["below"],
        },
        "LLA": {
            "left of": ["on the left side of", "next to"],
            "right of": ["on the right side of", "next to"],
            "above": ["over", "above"],
            "below": ["under", "below"],
        },
        "SV": {
            "left of": ["slightly to the left of", "left of"],
            "right of": ["slightly to the right of", "right of"],
            "above": ["higher than", "above"],
            "below": ["beneath", "lower than"],
        },
    }[style][rel]
    return table[int(rng.integers(len(table)))]


def relation_sentences(objs, image_size: int, style: str, rng: np.random.Generator, name: Callable) -> list[str]:
    """A captioner style's sentence for each pair of (real) objects far enough apart to say where
    one is relative to the other, in a random order; ``name(obj, style, rng)`` names an object."""
    out = []
    for a, b, r in relation_pairs(objs, image_size, rng):
        if style == "LLA":
            phrase = relation_phrase(r, style, rng)
            verb = "is" if phrase == "next to" else "is located"
            out.append(f"The {name(a, style, rng)} {verb} {phrase} the {name(b, style, rng)}.")
        elif style == "IB":
            out.append(f"The {name(a, style, rng)} is {relation_phrase(r, style, rng)} the {name(b, style, rng)}.")
        else:
            out.append(f"Notably, the {name(a, style, rng)} sits {relation_phrase(r, style, rng)} the {name(b, style, rng)}.")
    return out


def _name(o: ObjectDesc, style: str, rng: np.random.Generator) -> str:
    """'red star' style short reference to an object."""
    return f"{pick_form(COLOR_FORMS[o.color], style, rng)} {pick_form(SHAPE_FORMS[o.shape], style, rng)}"


def count_phrase(n: int, noun: str) -> str:
    return f"{COUNT_WORDS.get(n, str(n))} {noun}{'' if n == 1 else 's'}"


# ---- IB: terse ------------------------------------------------------------------------------


def _ib(scene: SceneDesc, objs: list[ObjectDesc], rng: np.random.Generator):
    st = "IB"
    tone = pick_form(BG_TONE_FORMS[scene.bg_tone], st, rng)
    kind = pick_form(BG_KIND_FORMS[scene.bg_kind], st, rng)
    n = len(objs)
    mention = objs[: min(n, 1 + int(rng.integers(2)) + (n > 2))]
    nps = []
    for k, o in enumerate(mention):
        words = []
        if k == 0 and rng.random() < 0.6:
            words.append(pick_form(SIZE_FORMS[o.size], st, rng))
        words.append(_name(o, st, rng))
        nps.append(with_article(" ".join(words)))
    short = " and ".join(nps) if len(nps) < 3 else f"{nps[0]}, {nps[1]} and {nps[2]}"
    short += f" on a {tone} background" if rng.random() < 0.7 else ""

    head = [f"There {'is' if n == 1 else 'are'} {count_phrase(n, 'shape')} in the image."]
    opt_bg = [f"The background is {tone} and {kind}."]
    body, opt_tex = [], []
    for o in objs:
        size = pick_form(SIZE_FORMS[o.size], st, rng)
        tex = pick_form(TEXTURE_ADJ[o.texture], st, rng)
        pos = position_phrase(o.position, st, rng)
        if o.texture != "solid" and rng.random() < 0.5:
            body.append([f"There is {with_article(f'{size} {tex} {_name(o, st, rng)}')} {pos}."])
        else:
            body.append([f"There is {with_article(f'{size} {_name(o, st, rng)}')} {pos}."])
            opt_tex.append((len(body) - 1, f"The {pick_form(SHAPE_FORMS[o.shape], st, rng)} is {tex}."))
    rels = relation_sentences(objs, scene.image_size, st, rng, _name)
    extra = [f"The biggest shape is the {_name(objs[0], st, rng)}."] if n > 1 else []
    closing = [f"The shapes are drawn on a {tone} background.", "The image is simple."]
    return short, assemble_long(head, opt_bg, body, opt_tex, extra + rels, closing, rng)


# ---- LLA: "The image shows ..." ------------------------------------------------------------


def _lla_np(o: ObjectDesc, rng: np.random.Generator, size: bool = True) -> str:
    st = "LLA"
    words = [pick_form(SIZE_FORMS[o.size], st, rng)] if size else []
    if rng.random() < 0.5:
        words += [pick_form(TEXTURE_ADJ[o.texture], st, rng), _name(o, st, rng)]
        return with_article(" ".join(words))
    words.append(_name(o, st, rng))
    return f"{with_article(' '.join(words))} {pick_form(TEXTURE_WITH[o.texture], st, rng)}"


def _lla(scene: SceneDesc, objs: list[ObjectDesc], rng: np.random.Generator):
    st = "LLA"
    tone = pick_form(BG_TONE_FORMS[scene.bg_tone], st, rng)
    kind = pick_form(BG_KIND_FORMS[scene.bg_kind], st, rng)
    n = len(objs)
    nps = [with_article(_name(o, st, rng)) for o in objs]
    listed = nps[0] if n == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
    short = f"The image shows {listed} on a {tone} {kind} background."

    head = [f"The image shows {count_phrase(n, 'colorful geometric shape')} on a {tone} {kind} background."]
    opt_bg = [
        f"The background has a {kind} pattern in a {tone} tone."
        if rng.random() < 0.5
        else f"Behind the shapes, the background is {kind} and {tone}."
    ]
    body = []
    for k, o in enumerate(objs):
        pos = position_phrase(o.position, st, rng)
        r = rng.random()
        if r < 0.4:
            body.append([f"{capitalize(pos)}, there is {_lla_np(o, rng)}."])
        elif r < 0.75:
            body.append([f"{capitalize(_lla_np(o, rng))} can be seen {pos}."])
        else:
            also = "also " if k > 0 else ""
            body.append([f"There is {also}{_lla_np(o, rng)} placed {pos}."])
    rels = relation_sentences(objs, scene.image_size, st, rng, _name)
    closing = [
        "Overall, the image has a simple and clean look.",
        "The shapes are clearly visible and easy to see.",
        "The picture looks like a simple illustration.",
    ]
    return short, assemble_long(head, opt_bg, body, [], rels, closing, rng)


# ---- SV: verbose -----------------------------------------------------------------------------


def _sv(scene: SceneDesc, objs: list[ObjectDesc], rng: np.random.Generator):
    st = "SV"
    tone = pick_form(BG_TONE_FORMS[scene.bg_tone], st, rng)
    kind = pick_form(BG_KIND_FORMS[scene.bg_kind], st, rng)
    n = len(objs)
    main = objs[0]
    short = (
        f"A minimalist composition of {count_phrase(n, 'geometric figure')}, including "
        f"{with_article(pick_form(SIZE_FORMS[main.size], st, rng) + ' ' + _name(main, st, rng))}, "
        f"set against a {tone} {kind} backdrop."
    )

    head = [
        f"This simple digital drawing presents {count_phrase(n, 'geometric figure')} arranged "
        f"against a {tone}, {kind} backdrop."
    ]
    opt_bg = [f"The {kind} backdrop, {tone} in tone, gives the composition a calm feel."]
    body = []
    for o in objs:
        pos = position_phrase(o.position, st, rng)
        size = pick_form(SIZE_FORMS[o.size], st, rng)
        shape = pick_form(SHAPE_FORMS[o.shape], st, rng)
        color = pick_form(COLOR_FORMS[o.color], st, rng)
        r = rng.random()
        if r < 0.35:
            body.append(
                [
                    f"Positioned {pos}, {with_article(f'{size} {color} {shape}')} "
                    f"{pick_form(TEXTURE_WITH[o.texture], st, rng)} catches the eye."
                ]
            )
        elif r < 0.7:
            body.append(
                [
                    f"{capitalize(with_article(f'{size} {pick_form(TEXTURE_ADJ[o.texture], st, rng)} {shape}'))} "
                    f"in a vivid shade of {color} is sitting {pos}."
                ]
            )
        else:
            body.append(
                [
                    f"{capitalize(pos)}, the viewer finds {with_article(f'{size} {shape}')} rendered in "
                    f"{color}, {pick_form(TEXTURE_WITH[o.texture], st, rng)}."
                ]
            )
    rels = relation_sentences(objs, scene.image_size, st, rng, _name)
    extra = (
        [f"The largest of the figures is the {_name(main, st, rng)}, which dominates the frame."]
        if n > 1
        else []
    )
    closing = [
        f"The overall arrangement feels playful yet balanced, and the {tone} backdrop "
        f"makes the colors stand out.",
        "Crisp edges and saturated hues give the picture a clean, graphic quality.",
        "No text or other objects other than these figures are present in the scene.",
        "There is plenty of empty space around the figures.",
    ]
    return short, assemble_long(head, opt_bg, body, [], extra + rels, closing, rng)


def assemble_long(head, opt_bg, body, opt_tex, rels, closing, rng: np.random.Generator) -> str:
    """Join sentences into a long caption of 4 to 9 sentences.

    Mandatory: the scene sentence and one sentence per object. Optional sentences (background,
    texture, relations, closing) are added up to a random target length, then padded with
    closings if still short."""
    target = int(rng.integers(4, 10))
    n_mand = len(head) + len(body)
    optional: list[tuple[str, object]] = []
    optional += [("bg", s) for s in opt_bg]
    optional += [("tex", t) for t in opt_tex]
    optional += [("rel", s) for s in rels[:3]]
    closing = [closing[int(i)] for i in rng.permutation(len(closing))]
    n_close = int(rng.integers(0, 2))
    optional += [("close", s) for s in closing[:n_close]]
    order = rng.permutation(len(optional))
    chosen = sorted(order[: max(0, target - n_mand)].tolist())
    picked = [optional[i] for i in chosen]
    used_close = {s for k, s in picked if k == "close"}
    while n_mand + len(picked) < 4:
        spare = [s for s in closing if s not in used_close]
        if spare:
            used_close.add(spare[0])
            picked.append(("close", spare[0]))
        else:  # cannot happen with >= 2 closings and >= 1 object, kept for safety
            picked.append(("close", "The image is simple."))
    sentences = list(head)
    sentences += [s for k, s in picked if k == "bg"]
    tex_by_obj = {i: s for k, (i, s) in ((k, v) for k, v in picked if k == "tex")}
    for i, group in enumerate(body):
        sentences += group
        if i in tex_by_obj:
            sentences.append(tex_by_obj[i])
    sentences += [s for k, s in picked if k == "rel"]
    sentences += [s for k, s in picked if k == "close"]
    return " ".join(sentences[:9])


_STYLE_FN: dict[str, Callable] = {"IB": _ib, "LLA": _lla, "SV": _sv}


def captioner_captions(
    scene: SceneDesc, names: Sequence[str], rng: np.random.Generator
) -> dict[str, dict[str, str]]:
    """``{captioner: {"short": ..., "long": ...}}`` for one image."""
    out = {}
    for name in names:
        objs = perceive(scene, CAPTIONERS[name], rng)
        short, long = _STYLE_FN[name](scene, objs, rng)
        out[name] = {"short": short, "long": long}
    return out


# --------------------------------------------------------------------------------------------
# Raw caption (alt-text)


def junk_words(k: int, rng: np.random.Generator) -> list[str]:
    """``k`` distinct words of the web's alt-text junk (stock-site and file-type words)."""
    return [JUNK[int(i)] for i in rng.choice(len(JUNK), size=k, replace=False)]


def alt_text(phrase: str, background: str, rng: np.random.Generator) -> str:
    """``phrase`` dressed as web alt-text: alone or among junk words, 10 % of the time followed by
    "on ``background``", in web casing."""
    r = rng.random()
    if r < 0.25:
        text = phrase
    elif r < 0.55:
        text = f"{phrase} {' '.join(junk_words(int(rng.integers(1, 3)), rng))}"
    elif r < 0.75:
        text = f"{' '.join(junk_words(int(rng.integers(1, 3)), rng))} {phrase}"
    elif r < 0.9:
        text = f"{phrase} - {' '.join(junk_words(int(rng.integers(2, 4)), rng))}"
    else:
        text = f"{phrase} on {background} {junk_words(1, rng)[0]}"
    return web_case(text, rng)


def raw_caption(scene: SceneDesc, rng: np.random.Generator) -> str:
    """Web-alt-text-like: at most one object, few attributes, sometimes wrong, junk words."""
    objs = scene.by_area
    r = rng.random()
    if r < 0.10:  # nothing about the content
        k = int(rng.integers(2, 4))
        text = " ".join(junk_words(k, rng)) if rng.random() < 0.7 else f"img {int(rng.integers(100, 9999))}"
        return web_case(text, rng)
    obj = objs[0] if r < 0.75 or len(objs) == 1 else objs[1 + int(rng.integers(len(objs) - 1))]
    shape = obj.shape
    if rng.random() < 0.05:  # wrong object name
        shape = SHAPES[int(rng.integers(len(SHAPES)))]

    # Alt-text is written by many people: mostly the plain word, sometimes any synonym.
    def form(forms: Sequence[str]) -> str:
        return forms[0] if rng.random() < 0.85 else pick_form(forms, "human", rng)

    words = [form(SHAPE_FORMS[shape])]
    if rng.random() < 0.6:
        color = obj.color
        if rng.random() < 0.15:
            color = COLORS[int(rng.integers(len(COLORS)))]
        words.insert(0, form(COLOR_FORMS[color]))
    if rng.random() < 0.15:
        words.insert(0, form(TEXTURE_ADJ[obj.texture]))
    if rng.random() < 0.15:
        words.insert(0, form(SIZE_FORMS[obj.size]))
    return alt_text(" ".join(words), f"{scene.bg_tone} background", rng)


def web_case(text: str, rng: np.random.Generator) -> str:
    r = rng.random()
    if r < 0.25:
        return " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
    if r < 0.4:
        return capitalize(text)
    return text


# --------------------------------------------------------------------------------------------
# Held-out human style (test only)


def _human_np(o: ObjectDesc, rng: np.random.Generator) -> str:
    st = "human"
    words = []
    if rng.random() < 0.35:
        words.append(pick_form(SIZE_FORMS[o.size], st, rng))
    with_tex = None
    if rng.random() < 0.35:
        if rng.random() < 0.5:
            words.append(pick_form(TEXTURE_ADJ[o.texture], st, rng))
        else:
            with_tex = ["with stripes", "with spots", "with dots", "with a solid fill"][
                {"striped": 0, "dotted": 1 + int(rng.integers(2)), "solid": 3}[o.texture]
            ]
    if rng.random() < 0.9:
        words.append(pick_form(COLOR_FORMS[o.color], st, rng))
    words.append(pick_form(SHAPE_FORMS[o.shape], st, rng))
    out = with_article(" ".join(words))
    return f"{out} {with_tex}" if with_tex else out


def human_position(pos: str, rng: np.random.Generator) -> str:
    row, col = divmod(POSITIONS.index(pos), 3)
    v = {0: ["top", "upper"], 2: ["bottom", "lower"]}.get(row)
    h = {0: "left", 2: "right"}.get(col)
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    if v and h:
        return pick([f"{pick(v)} {h} corner", f"{pick(v)} {h}", f"{pick(v)}-{h} part"])
    if v:
        return pick([f"{v[0]}", f"{v[1]} middle", f"{v[0]} edge"])
    if h:
        return pick([f"{h}", f"{h} side", f"middle {h}"])
    return pick(["middle", "center", "centre"])


def human_next_to(objs, scene, rng, describe):
    for a, b, r in relation_pairs(objs, scene.image_size, rng):
        if r in ("left of", "right of"):
            return f"{describe(a, rng)} next to {describe(b, rng)}"
    return None


def human_left_right(objs, scene, rng, describe):
    for a, b, r in relation_pairs(objs, scene.image_size, rng):
        if r in ("left of", "right of"):
            side = "left" if r == "left of" else "right"
            return f"{describe(a, rng)} to the {side} of {describe(b, rng)}"
    return None


def human_above_below(objs, scene, rng, describe):
    for a, b, r in relation_pairs(objs, scene.image_size, rng):
        if r in ("above", "below"):
            return f"{describe(a, rng)} placed {r} {describe(b, rng)}"
    return None


def human_where(objs, scene, rng, describe):
    o = objs[int(rng.integers(len(objs)))]
    return f"{describe(o, rng)} sitting in the {human_position(o.position, rng)}"


def human_three(objs, scene, rng, describe):
    if len(objs) < 3:
        return None
    idx = sorted(rng.choice(len(objs), size=3, replace=False).tolist())
    a, b, c = (describe(objs[i], rng) for i in idx)
    return f"{a} along with {b} and {c}"


def _h_backdrop(objs, scene, rng, describe):
    k = min(len(objs), 2)
    nps = [describe(o, rng) for o in objs[:k]]
    tone = pick_form(BG_TONE_FORMS[scene.bg_tone], "human", rng)
    bg = f"{tone} {pick_form(BG_KIND_FORMS[scene.bg_kind], 'human', rng)}"
    word = "backdrop" if rng.random() < 0.5 else "background"
    return f"{with_article(bg)} {word} behind {' and '.join(nps)}"


def human_including(objs, scene, rng, describe):
    o = objs[int(rng.integers(min(2, len(objs))))]
    return f"{count_phrase(len(objs), scene.noun)}, including {describe(o, rng)}"


def human_and_others(objs, scene, rng, describe):
    if len(objs) < 2:
        return None
    k = len(objs) - 1
    return f"{describe(objs[0], rng)} and {COUNT_WORDS[k]} other {scene.noun}{'s' if k > 1 else ''}"


def _h_see(objs, scene, rng, describe):
    a, b = objs[0], objs[1 + int(rng.integers(len(objs) - 1))]
    return f"this picture has {describe(a, rng)} and {describe(b, rng)}"


HUMAN_TEMPLATES: list[Callable] = [
    human_next_to,
    human_left_right,
    human_above_below,
    human_where,
    human_three,
    _h_backdrop,
    human_including,
    human_and_others,
    _h_see,
]


def human_captions(
    scene,
    rng: np.random.Generator,
    n_min: int = 3,
    n_max: int = 5,
    templates: Sequence[Callable] = HUMAN_TEMPLATES,
    describe: Callable = _human_np,
) -> list[str]:
    """3 to 5 correct, held-out-style captions for a test image (retrieval queries), each from
    another of ``templates`` (``f(objects largest first, scene, rng, describe) -> text or None``,
    ``describe(object, rng)`` writing an object's noun phrase in the held-out style). The
    ``human_*`` templates serve any set whose objects have ``position``, ``cx``, ``cy`` and whose
    scene names its objects by ``noun``."""
    objs = scene.by_area
    n = int(rng.integers(n_min, n_max + 1))
    out: list[str] = []
    for k in rng.permutation(len(templates)):
        text = templates[int(k)](objs, scene, rng, describe)
        if text is None or text in out:
            continue
        r = rng.random()
        text = capitalize(text) + "." if r < 0.5 else (capitalize(text) if r < 0.8 else text)
        out.append(text)
        if len(out) == n:
            break
    return out


# Zero-shot prompts in the human style (training text never uses these frames).
CLASSIFICATION_TEMPLATES = [
    "a drawing of a {}.",
    "a {} in the scene.",
    "a picture with a {} in it.",
    "a simple {} drawn on a background.",
    "a colorful {}.",
]
