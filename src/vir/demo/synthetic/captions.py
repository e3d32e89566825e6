"""Stage-1 captions (every object plus relation sentences) and text-only questions about the task's world."""

from __future__ import annotations

from typing import Callable, List, Tuple

import numpy as np

from vir.demo.config import SyntheticConfig
from vir.demo.synthetic.language import (
    RELATION_PHRASES,
    RELATIONS,
    article,
    cell_phrase,
    choice,
    corner_name,
    join_words,
    number_word,
    relation_holds,
)
from vir.demo.synthetic.scene import SIZES, Scene, SceneObject

# LLaVA-558k style: the plain template keeps only the image, the llama3 template sees the instruction too.
CAPTION_INSTRUCTIONS = (
    "Describe the image.",
    "Describe the image briefly.",
    "List the objects in the image.",
    "What is in the picture?",
)
MAX_RELATION_SENTENCES = 2


def caption(rng: np.random.Generator, scene: Scene) -> str:
    """Every object (size, colour, shape, 1-based row and column) in reading order, then up to two true
    relations between uniquely named objects; the phrasing varies with `rng`, deterministically."""
    n = len(scene.objects)
    g = scene.grid
    intro = choice(rng, (f"There are {number_word(n)} objects.", f"The image shows {number_word(n)} objects.",
                         f"{number_word(n).capitalize()} objects are on a {g} by {g} grid."))
    sentences = [intro] + [_object_sentence(rng, obj) for obj in scene.objects]
    sentences += _relation_sentences(rng, scene)
    return " ".join(sentences)


def _object_sentence(rng: np.random.Generator, obj: SceneObject) -> str:
    what = f"{obj.size} {obj.colour} {obj.shape}"
    where = cell_phrase(obj.row, obj.col)
    template = choice(rng, ("{A} {what} is in {where}.", "There is {a} {what} in {where}.",
                            "{Where} has {a} {what}."))
    a = article(what)
    return template.format(A=a.capitalize(), a=a, what=what, where=where, Where=where.capitalize())


def _relation_sentences(rng: np.random.Generator, scene: Scene) -> List[str]:
    named = scene.uniquely_named()
    pairs = [(a, b) for i, a in enumerate(named) for b in named[i + 1 :]]
    sentences = []
    for _ in range(min(MAX_RELATION_SENTENCES, len(pairs))):
        a, b = pairs.pop(int(rng.integers(len(pairs))))
        if rng.random() < 0.5:
            a, b = b, a
        true = [r for r in RELATIONS if relation_holds(r, a.row, a.col, b.row, b.col)]
        sentences.append(f"The {a.name} is {RELATION_PHRASES[choice(rng, true)]} the {b.name}.")
    return sentences


def text_only_qa(rng: np.random.Generator, spec: SyntheticConfig) -> Tuple[str, str]:
    """A question answerable without an image (the task's vocabulary, grid, numbers, positions)."""
    return choice(rng, _TEXT_ONLY)(rng, spec)


def _colours(rng, spec):
    return "Which colours can objects have?", f"Objects can be {join_words(spec.colours, 'or')}."


def _shapes(rng, spec):
    return "Which shapes can objects have?", f"The shapes are {join_words(spec.shapes)}."


def _sizes(rng, spec):
    return "What sizes can objects have?", f"Objects are either {join_words(SIZES, 'or')}."


def _grid_count(rng, spec):
    what = choice(rng, ("cells", "rows", "columns"))
    n = spec.grid * spec.grid if what == "cells" else spec.grid
    return f"How many {what} does the grid have?", number_word(n)


def _object_range(rng, spec):
    if rng.random() < 0.5:
        return "What is the largest number of objects in one image?", number_word(spec.max_objects)
    return "What is the smallest number of objects in one image?", number_word(spec.min_objects)


def _next_number(rng, spec):
    k = int(rng.integers(1, 9))
    if rng.random() < 0.5:
        return f"What number comes after {number_word(k)}?", number_word(k + 1)
    return f"What number comes before {number_word(k)}?", number_word(k - 1)


def _addition(rng, spec):
    a, b = (int(v) for v in rng.integers(0, 5, size=2))
    return f"What is {number_word(a)} plus {number_word(b)}?", number_word(a + b)


def _further(rng, spec):
    a, b = (int(v) + 1 for v in rng.choice(spec.grid, size=2, replace=False))
    if rng.random() < 0.5:
        return f"Which is further left, column {a} or column {b}?", f"column {min(a, b)}"
    return f"Which is higher up, row {a} or row {b}?", f"row {min(a, b)}"


def _corner(rng, spec):
    row, col = (int(v) * (spec.grid - 1) for v in rng.integers(0, 2, size=2))
    return f"Which corner is row {row + 1}, column {col + 1}?", f"The {corner_name(row, col, spec.grid)}."


def _kind_of_word(rng, spec):
    if rng.random() < 0.5:
        return f"Is {choice(rng, spec.colours)} a colour or a shape?", "a colour"
    return f"Is {article(s := choice(rng, spec.shapes))} {s} a colour or a shape?", "a shape"


_TEXT_ONLY: Tuple[Callable[[np.random.Generator, SyntheticConfig], Tuple[str, str]], ...] = (
    _colours, _shapes, _sizes, _grid_count, _object_range, _next_number, _addition, _further, _corner,
    _kind_of_word,
)
