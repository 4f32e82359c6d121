"""Text of the real-image development set: web-like alt-text, three simulated captioners that
miss, misname, misplace and hallucinate objects, and a held-out "human" test style.

The captioners' machinery is the embedded synthetic set's (:mod:`dreamlip.synthetic.text`: style
preferences among surface forms, position and relation phrases, the 4-to-9-sentence assembly,
alt-text casing); what differs is the vocabulary (object categories, backgrounds, digits, facing)
and the error model, which adds misnaming (the object called something it is not) and a wrong
background to the synthetic set's misses, wrong attributes, wrong positions and hallucinations.
Test text (retrieval captions, zero-shot prompts) uses sentence frames no training text uses, with
words that all occur in training text; it describes the true scene.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Sequence

import numpy as np

from dreamlip.realset.sources import BACKGROUNDS, CATEGORIES, DIGIT_WORDS, FACING
from dreamlip.synthetic.text import (
    COUNT_WORDS,
    DIRECTION_WORDS,
    FUNCTION_WORDS,
    NEIGHBOURS,
    SIZE_FORMS,
    SIZES,
    alt_text,
    assemble_long,
    capitalize,
    count_phrase,
    human_above_below,
    human_and_others,
    human_including,
    human_left_right,
    human_next_to,
    human_three,
    human_where,
    junk_words,
    lower_words,
    pick_form,
    position_phrase,
    relation_sentences,
    web_case,
    with_article,
)

# Surface forms: IB prefers form 0, LLA forms 1/0, SV forms 2+/1 (pick_form); the human test style
# draws from all. Form 0 is the class name zero-shot classification and segmentation use.
NOUN_FORMS = {
    "cat": ["cat", "tabby cat", "kitty"],
    "coffee cup": ["coffee cup", "cup of coffee", "espresso cup"],
    "coin": ["coin", "old coin", "ancient coin"],
    "horse": ["horse", "black horse", "horse silhouette"],
    "photographer": ["photographer", "cameraman", "man with a camera"],
    "flower": ["flower", "orange flower", "dahlia"],
    "handwritten digit": ["handwritten digit", "digit", "handwritten number"],
    "astronaut": ["astronaut", "woman astronaut", "astronaut in a spacesuit"],
}
# What a captioner calls an object it misnames: look-alikes that are no category of the set.
MISNAMES = {
    "cat": ["dog", "fox", "tiger"],
    "coffee cup": ["bowl", "teapot"],
    "coin": ["button", "medal"],
    "horse": ["dog", "deer"],
    "photographer": ["tourist", "soldier"],
    "flower": ["rose", "orange"],
    "handwritten digit": ["letter", "symbol"],
    "astronaut": ["pilot", "firefighter"],
}
BACKGROUND_FORMS = {
    "brick wall": ["a brick wall", "a wall of bricks", "brickwork"],
    "grass": ["grass", "a lawn", "grassy ground"],
    "gravel": ["gravel", "pebbles", "a gravel path"],
    "night sky": ["a night sky", "a starry sky", "a field of stars"],
    "wooden table": ["a wooden table", "a wooden surface", "a timber tabletop"],
    "printed page": ["a printed page", "a page of text", "a sheet of printed text"],
    "leaves": ["green leaves", "dark foliage", "leafy greenery"],
    "sky": ["a blue sky", "a clear sky", "a hazy sky"],
}
# What each category looks like, for the captioners' detail sentences (true of every instance).
FEATURES = {
    "cat": ["green eyes", "striped brown fur", "long white whiskers"],
    "coffee cup": ["a red saucer", "a small spoon", "dark coffee inside"],
    "coin": ["a worn grey surface", "an embossed figure"],
    "horse": ["a solid black outline", "four long legs"],
    "photographer": ["a dark coat", "a camera held up to his eye"],
    "flower": ["orange petals", "many layers of petals"],
    "handwritten digit": ["grey pen strokes", "a white paper background"],
    "astronaut": ["an orange spacesuit", "short blond hair", "a wide smile"],
}
assert list(NOUN_FORMS) == CATEGORIES and list(BACKGROUND_FORMS) == list(BACKGROUNDS)
SIDES = ("left", "right")

# Zero-shot prompts in the held-out style (no training text uses these frames).
CLASSIFICATION_TEMPLATES = [
    "a photo of a {}.",
    "a {} in the scene.",
    "a picture with a {} in it.",
    "a cut-out photo of a {}.",
    "a {} placed on a background.",
]


def _all_forms() -> list[str]:
    tables = (NOUN_FORMS, MISNAMES, BACKGROUND_FORMS, SIZE_FORMS)
    return [form for table in tables for forms in table.values() for form in forms] + DIGIT_WORDS


# Attribute words, turned into '#' by skeleton(text, SLOT_WORDS) when comparing sentence frames.
SLOT_WORDS = (
    frozenset(w for form in _all_forms() for w in lower_words(form) if w not in FUNCTION_WORDS)
    | DIRECTION_WORDS
    | frozenset(COUNT_WORDS.values())
    | {"object", "objects", "things"}
)


# --------------------------------------------------------------------------------------------
# Scene description shared with the renderer


@dataclass(frozen=True)
class Thing:
    category: str
    size: str
    position: str
    detail: str | None = None  # the digit a handwritten digit shows, the side a horse faces
    cx: float = 0.0  # centre in pixels (relations are computed from these)
    cy: float = 0.0
    area: int = 0  # visible pixels
    hallucinated: bool = False
    misname: str | None = None  # what a captioner calls it when it gets its category wrong


@dataclass(frozen=True)
class Scene:
    objects: tuple[Thing, ...]  # drawing order (back to front)
    background: str
    image_size: int
    noun: ClassVar[str] = "object"  # what the held-out captions call an object

    @property
    def by_area(self) -> list[Thing]:
        return sorted(self.objects, key=lambda o: -o.area)


# --------------------------------------------------------------------------------------------
# Captioners


@dataclass(frozen=True)
class Captioner:
    name: str
    p_miss: float  # per object other than the largest: left out
    p_misname: float  # per object: called by a look-alike's name (MISNAMES)
    p_wrong_size: float  # per object: another size
    p_wrong_detail: float  # per object with a detail (digit, facing): another value
    p_wrong_position: float  # per object: a neighbouring grid cell
    p_hallucinate: float  # per image: an object of an absent category
    p_wrong_background: float  # per image: another background


CAPTIONERS: dict[str, Captioner] = {
    # InstructBLIP-like: terse, misses and misnames the most.
    "IB": Captioner("IB", p_miss=0.20, p_misname=0.10, p_wrong_size=0.10, p_wrong_detail=0.20,
                    p_wrong_position=0.06, p_hallucinate=0.05, p_wrong_background=0.08),
    # LLaVA-like: "The image shows ...", hallucinates the most.
    "LLA": Captioner("LLA", p_miss=0.12, p_misname=0.06, p_wrong_size=0.08, p_wrong_detail=0.12,
                     p_wrong_position=0.05, p_hallucinate=0.12, p_wrong_background=0.05),
    # ShareGPT4V-like: verbose, the most complete.
    "SV": Captioner("SV", p_miss=0.08, p_misname=0.04, p_wrong_size=0.06, p_wrong_detail=0.08,
                    p_wrong_position=0.04, p_hallucinate=0.08, p_wrong_background=0.04),
}

# Alt-text: what the raw caption names (the rest of the time the largest object); then, when it
# names something, how often it uses a synonym and adds the size and the detail (the background:
# 10 %, dreamlip.synthetic.text.alt_text).
RAW_CAPTION_RATES = {"nothing": 0.25, "other_object": 0.15, "absent_object": 0.15,
                     "size": 0.15, "detail": 0.10, "synonym": 0.15}


def _other(values: Sequence[str], current: str, rng: np.random.Generator) -> str:
    others = [v for v in values if v != current]
    return others[int(rng.integers(len(others)))]


def _detail_values(category: str) -> Sequence[str]:
    return DIGIT_WORDS if category == "handwritten digit" else SIDES


def perceive(scene: Scene, spec: Captioner, rng: np.random.Generator) -> tuple[list[Thing], str]:
    """What a captioner 'sees': the objects largest first, with misses, wrong names, sizes,
    details and positions, an occasional hallucinated object, and the background it names."""
    seen: list[Thing] = []
    for rank, obj in enumerate(scene.by_area):
        if rank > 0 and rng.random() < spec.p_miss:
            continue
        changes: dict[str, object] = {}
        if rng.random() < spec.p_misname:
            names = MISNAMES[obj.category]
            changes["misname"] = names[int(rng.integers(len(names)))]
        if rng.random() < spec.p_wrong_size:
            changes["size"] = _other(SIZES, obj.size, rng)
        if obj.detail is not None and rng.random() < spec.p_wrong_detail:
            changes["detail"] = _other(_detail_values(obj.category), obj.detail, rng)
        if rng.random() < spec.p_wrong_position:
            neighbours = NEIGHBOURS[obj.position]
            changes["position"] = neighbours[int(rng.integers(len(neighbours)))]
        seen.append(replace(obj, **changes))
    if rng.random() < spec.p_hallucinate:
        absent = [c for c in CATEGORIES if c not in {o.category for o in scene.objects}]
        free = [p for p in NEIGHBOURS if p not in {o.position for o in scene.objects}]
        category = absent[int(rng.integers(len(absent)))]
        detail = None
        if category == "handwritten digit" or category in FACING:
            values = _detail_values(category)
            detail = values[int(rng.integers(len(values)))]
        seen.append(Thing(category, "small", free[int(rng.integers(len(free)))], detail, hallucinated=True))
    background = scene.background
    if rng.random() < spec.p_wrong_background:
        background = _other(list(BACKGROUNDS), background, rng)
    return seen, background


def _name(o: Thing, style: str, rng: np.random.Generator) -> str:
    return o.misname or pick_form(NOUN_FORMS[o.category], style, rng)


def _numeral(word: str) -> str:
    return str(DIGIT_WORDS.index(word))


def _detail(o: Thing, style: str) -> str:
    """The detail clause (with its leading space), or '' for objects without one."""
    if o.detail is None:
        return ""
    if o.category == "handwritten digit":
        return {"IB": f" showing the number {_numeral(o.detail)}",
                "LLA": f" with the digit {_numeral(o.detail)} on it",
                "SV": f" depicting the numeral {o.detail}"}[style]
    return {"IB": f" facing {o.detail}", "LLA": f" facing to the {o.detail}", "SV": f" turned toward the {o.detail}"}[style]


def _features(objs: Sequence[Thing], frame: str, rng: np.random.Generator, style: str) -> list[tuple[int, str]]:
    """Optional detail sentences, one per object: (object index, sentence)."""
    out = []
    for i, o in enumerate(objs):
        facts = FEATURES[o.category]
        out.append((i, frame.format(name=_name(o, style, rng), fact=facts[int(rng.integers(len(facts)))])))
    return out


def _ib(scene: Scene, objs: list[Thing], background: str, rng: np.random.Generator):
    st = "IB"
    bg = pick_form(BACKGROUND_FORMS[background], st, rng)
    n = len(objs)
    mention = objs[: min(n, 1 + int(rng.integers(2)))]
    nps = []
    for k, o in enumerate(mention):
        size = f"{pick_form(SIZE_FORMS[o.size], st, rng)} " if k == 0 and rng.random() < 0.6 else ""
        nps.append(with_article(size + _name(o, st, rng)))
    short = " and ".join(nps) + (f" on {bg}" if rng.random() < 0.7 else "")

    head = [f"There {'is' if n == 1 else 'are'} {count_phrase(n, 'object')} in the image."]
    opt_bg = [f"The background is {bg}."]
    body = [[f"There is {with_article(pick_form(SIZE_FORMS[o.size], st, rng) + ' ' + _name(o, st, rng))}"
             f"{_detail(o, st)} {position_phrase(o.position, st, rng)}."] for o in objs]
    features = _features(objs, "The {name} has {fact}.", rng, st)
    rels = relation_sentences(objs, scene.image_size, st, rng, _name)
    extra = [f"The biggest object is the {_name(objs[0], st, rng)}."] if n > 1 else []
    closing = ["The objects are pasted onto the background.", "The image looks like a collage."]
    return short, assemble_long(head, opt_bg, body, features, extra + rels, closing, rng)


def _lla(scene: Scene, objs: list[Thing], background: str, rng: np.random.Generator):
    st = "LLA"
    bg = pick_form(BACKGROUND_FORMS[background], st, rng)
    n = len(objs)
    nps = [with_article(_name(o, st, rng)) for o in objs]
    listed = nps[0] if n == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
    short = f"The image shows {listed} over {bg}."

    head = [f"The image shows {count_phrase(n, 'object')} placed over {bg}."]
    opt_bg = [f"Behind the {'object' if n == 1 else 'objects'}, there is {bg}."]
    body = []
    for k, o in enumerate(objs):
        pos = position_phrase(o.position, st, rng)
        np_ = with_article(f"{pick_form(SIZE_FORMS[o.size], st, rng)} {_name(o, st, rng)}") + _detail(o, st)
        r = rng.random()
        if r < 0.4:
            body.append([f"{capitalize(pos)}, there is {np_}."])
        elif r < 0.75:
            body.append([f"{capitalize(np_)} can be seen {pos}."])
        else:
            body.append([f"There is {'also ' if k > 0 else ''}{np_} placed {pos}."])
    features = _features(objs, "The {name} appears to have {fact}.", rng, st)
    rels = relation_sentences(objs, scene.image_size, st, rng, _name)
    closing = [
        "Overall, the picture looks like a playful collage.",
        "The objects are clearly visible.",
        "Each object seems to be cut out from another photo.",
    ]
    return short, assemble_long(head, opt_bg, body, features, rels, closing, rng)


def _sv(scene: Scene, objs: list[Thing], background: str, rng: np.random.Generator):
    st = "SV"
    bg = pick_form(BACKGROUND_FORMS[background], st, rng)
    n = len(objs)
    main = objs[0]
    short = (f"A collage of {count_phrase(n, 'cut-out object')}, including "
             f"{with_article(pick_form(SIZE_FORMS[main.size], st, rng) + ' ' + _name(main, st, rng))}, set against {bg}.")

    head = [f"This composite photograph presents {count_phrase(n, 'cut-out object')} arranged over {bg}."]
    opt_bg = [f"The backdrop of {bg} fills the whole frame."]
    body = []
    for o in objs:
        pos = position_phrase(o.position, st, rng)
        np_ = with_article(f"{pick_form(SIZE_FORMS[o.size], st, rng)} {_name(o, st, rng)}") + _detail(o, st)
        r = rng.random()
        if r < 0.35:
            body.append([f"Positioned {pos}, {np_} catches the eye."])
        elif r < 0.7:
            body.append([f"{capitalize(np_)} is sitting {pos}."])
        else:
            body.append([f"{capitalize(pos)}, the viewer finds {np_}."])
    features = _features(objs, "Looking closely, the {name} shows {fact}.", rng, st)
    rels = relation_sentences(objs, scene.image_size, st, rng, _name)
    extra = [f"The largest of the objects is the {_name(main, st, rng)}, which dominates the frame."] if n > 1 else []
    closing = [
        "The cut-out edges give the picture a playful, handmade quality.",
        "No other objects are present in the scene.",
        "The lighting of the objects differs from that of the backdrop.",
    ]
    return short, assemble_long(head, opt_bg, body, features, extra + rels, closing, rng)


_STYLE_FN: dict[str, Callable] = {"IB": _ib, "LLA": _lla, "SV": _sv}


def captioner_captions(scene: Scene, names: Sequence[str], rng: np.random.Generator) -> dict[str, dict[str, str]]:
    """``{captioner: {"short": ..., "long": ...}}`` for one image."""
    out = {}
    for name in names:
        objs, background = perceive(scene, CAPTIONERS[name], rng)
        short, long = _STYLE_FN[name](scene, objs, background, rng)
        out[name] = {"short": short, "long": long}
    return out


# --------------------------------------------------------------------------------------------
# Raw caption (alt-text)


def raw_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Web-alt-text-like: a file name or stock words, or one object (the largest, another one, or
    one that is not there), rarely with its size or detail, among junk words (the synthetic set's
    :func:`~dreamlip.synthetic.text.alt_text`, which also names the background 10 % of the time)."""
    rates = RAW_CAPTION_RATES
    r = rng.random()
    if r < rates["nothing"]:
        kind = rng.random()
        if kind < 0.6:
            return web_case(" ".join(junk_words(int(rng.integers(2, 4)), rng)), rng)
        return f"{'IMG_' if kind < 0.8 else 'DSC'}{int(rng.integers(100, 9999)):04d}{'.jpg' if kind >= 0.8 else ''}"
    objs = scene.by_area
    r -= rates["nothing"]
    if r < rates["absent_object"]:
        absent = [c for c in CATEGORIES if c not in {o.category for o in objs}]
        obj = Thing(absent[int(rng.integers(len(absent)))], SIZES[int(rng.integers(len(SIZES)))], "center")
    elif r < rates["absent_object"] + rates["other_object"] and len(objs) > 1:
        obj = objs[1 + int(rng.integers(len(objs) - 1))]
    else:
        obj = objs[0]
    forms = NOUN_FORMS[obj.category]
    noun = forms[int(rng.integers(len(forms)))] if rng.random() < rates["synonym"] else forms[0]
    words = [noun]
    if rng.random() < rates["size"]:
        words.insert(0, SIZE_FORMS[obj.size][0])
    if obj.detail is not None and rng.random() < rates["detail"]:
        words.append(_numeral(obj.detail) if obj.category == "handwritten digit" else f"facing {obj.detail}")
    return alt_text(" ".join(words), BACKGROUND_FORMS[scene.background][0], rng)


# --------------------------------------------------------------------------------------------
# Held-out human style (test only)


def human_noun_phrase(o: Thing, rng: np.random.Generator) -> str:
    words = []
    if rng.random() < 0.35:
        words.append(pick_form(SIZE_FORMS[o.size], "human", rng))
    if o.category == "handwritten digit" and rng.random() < 0.4:
        words.append(f"handwritten {_numeral(o.detail) if rng.random() < 0.5 else o.detail}")
    else:
        words.append(pick_form(NOUN_FORMS[o.category], "human", rng))
    out = with_article(" ".join(words))
    if o.category in FACING and rng.random() < 0.4:
        out += f" facing {o.detail}"
    return out


def _h_backdrop(objs, scene, rng, describe):
    nps = [describe(o, rng) for o in objs[:2]]
    return f"{pick_form(BACKGROUND_FORMS[scene.background], 'human', rng)} behind {' and '.join(nps)}"


def _h_see(objs, scene, rng, describe):
    if len(objs) < 2:
        return f"this picture has {describe(objs[0], rng)}"
    return f"this picture has {describe(objs[0], rng)} and {describe(objs[1 + int(rng.integers(len(objs) - 1))], rng)}"


# the held-out frames, drawn by dreamlip.synthetic.text.human_captions with human_noun_phrase
HUMAN_TEMPLATES: list[Callable] = [
    human_next_to, human_left_right, human_above_below, human_where, human_three,
    _h_backdrop, human_including, human_and_others, _h_see,
]
