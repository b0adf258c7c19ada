"""Prompt grammar of the toy world: colours × shapes × counts × relations.

Three prompt categories:

* ``single``   — ``"a red circle"``
* ``count``    — ``"two blue squares"``, ``"three yellow triangles"``
* ``relation`` — ``"a green triangle to the left of a yellow circle"`` (the two objects differ in colour)

:func:`parse` turns a prompt into a :class:`Scene` (expected objects and relation); the renderer and the
exact reward both work from it. The train/held-out split is a fixed seeded 80/20 split per category.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
PLURALS = {s: s + "s" for s in SHAPES}
COUNT_WORDS = {"a": 1, "one": 1, "two": 2, "three": 3}
RELATIONS = ("to the left of", "to the right of", "above", "below")
#: each relation's axis (0: x, 1: y; image coordinates, y down) and sign (+1: the first object has the smaller
#: coordinate) - "A <relation> B" holds when sign · (B − A) along the axis is positive
RELATION_AXES = {"to the left of": (0, 1), "to the right of": (0, -1), "above": (1, 1), "below": (1, -1)}
CATEGORIES = ("single", "count", "relation")

#: shape nouns (singular and plural) — the object tokens D-Fusion builds its masks from
OBJECT_WORDS = SHAPES + tuple(PLURALS.values())
#: every word the grammar can produce (the tokenizer's vocabulary)
VOCAB = tuple(
    dict.fromkeys(list(COUNT_WORDS) + list(COLOURS) + list(OBJECT_WORDS) + " ".join(RELATIONS).split())
)

_HELDOUT_FRACTION = 0.2
_SPLIT_SEED = 1234


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: ``objects`` = ((colour, shape), ...) with multiplicity; ``relation`` holds
    (relation, 0, 1) meaning "object 0 <relation> object 1", or None."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "relation"
        return "single" if len(self.objects) == 1 else "count"


def _object_phrase(words: list[str], i: int) -> tuple[int, str, str, int]:
    """Parse ``<count> <colour> <shape(s)>`` starting at words[i] -> (count, colour, shape, next index)."""
    if i + 3 > len(words):
        raise ValueError("expected '<count> <colour> <shape>' (e.g. 'a red circle')")
    count_w, colour, noun = words[i : i + 3]
    if count_w not in COUNT_WORDS:
        raise ValueError(f"expected a count word {sorted(COUNT_WORDS)}, got {count_w!r}")
    if colour not in COLOURS:
        raise ValueError(f"expected a colour {list(COLOURS)}, got {colour!r}")
    count = COUNT_WORDS[count_w]
    nouns = SHAPES if count == 1 else tuple(PLURALS.values())
    if noun not in nouns:
        raise ValueError(f"expected a shape noun {list(nouns)} after {count_w!r}, got {noun!r}")
    return count, colour, noun.rstrip("s") if count > 1 else noun, i + 3


@lru_cache(maxsize=4096)
def parse(prompt: str) -> Scene:
    """Parse a toy prompt into a :class:`Scene`; raises ValueError naming what was expected."""
    words = prompt.lower().strip().rstrip(".").split()
    try:
        count, colour, shape, i = _object_phrase(words, 0)
        if i == len(words):
            return Scene(objects=((colour, shape),) * count)
        rest = " ".join(words[i:])
        rel = next((r for r in RELATIONS if rest.startswith(r + " ")), None)
        if rel is None or count != 1:
            raise ValueError(f"expected end of prompt or a relation {list(RELATIONS)} after a single object")
        count2, colour2, shape2, j = _object_phrase(words, i + len(rel.split()))
        if count2 != 1 or j != len(words):
            raise ValueError("expected exactly one object after the relation")
        return Scene(objects=((colour, shape), (colour2, shape2)), relation=rel)
    except ValueError as e:
        raise ValueError(f"not a toy-world prompt: {prompt!r}: {e}") from None


def relation_gap(relation: str, a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Signed distance from object ``a`` to object ``b`` (positions (x, y, ...)) along ``relation``'s axis,
    positive when "a <relation> b" holds."""
    axis, sign = RELATION_AXES[relation]
    return sign * (b[axis] - a[axis])


def prompt_category(prompt: str) -> str:
    """``"single"``, ``"count"`` or ``"relation"``."""
    return parse(prompt).category


def _all_prompts() -> dict[str, list[str]]:
    singles = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    counts = [f"{n} {c} {PLURALS[s]}" for n in ("two", "three") for c in COLOURS for s in SHAPES]
    relations = [
        f"a {c1} {s1} {r} a {c2} {s2}"
        for r in RELATIONS
        for c1 in COLOURS
        for s1 in SHAPES
        for c2 in COLOURS
        for s2 in SHAPES
        if c1 != c2
    ]
    return {"single": singles, "count": counts, "relation": relations}


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[str, ...], tuple[str, ...]]:
    rng = random.Random(_SPLIT_SEED)
    train, held = [], []
    for prompts in _all_prompts().values():
        p = list(prompts)
        rng.shuffle(p)
        k = max(1, round(len(p) * _HELDOUT_FRACTION))
        held += sorted(p[:k])
        train += sorted(p[k:])
    return tuple(train), tuple(held)


def train_prompts(category: str | None = None) -> list[str]:
    """Training prompts (optionally only one category)."""
    return [p for p in _splits()[0] if category is None or prompt_category(p) == category]


def heldout_prompts(category: str | None = None) -> list[str]:
    """Held-out prompts (never seen in pretraining), optionally one category."""
    return [p for p in _splits()[1] if category is None or prompt_category(p) == category]


def get_prompts(name: str) -> list[str]:
    """Named prompt set: ``train``, ``heldout``, ``all``, or ``<split>:<category>`` (e.g. ``heldout:single``)."""
    split, _, cat = name.partition(":")
    cat = cat or None
    if cat is not None and cat not in CATEGORIES:
        raise ValueError(f"unknown prompt category {cat!r}; expected one of {list(CATEGORIES)}")
    if split == "train":
        return train_prompts(cat)
    if split == "heldout":
        return heldout_prompts(cat)
    if split == "all":
        return train_prompts(cat) + heldout_prompts(cat)
    raise ValueError(
        f"unknown prompt set {name!r}; expected 'train', 'heldout' or 'all' (optionally ':<category>')"
    )
