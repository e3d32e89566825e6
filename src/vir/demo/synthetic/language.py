"""Words shared by questions and captions: numbers, positions, relations (scoring is `vir.inference.scoring`)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()

# Relation of object a to object b; truth is strict on the grid (same column is neither left nor right).
RELATIONS = ("left", "right", "above", "below")
RELATION_PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}

# The suffix that asks for a sentence: it alone decides the answer style, so exact match is well defined.
SENTENCE_SUFFIX = " Answer with a full sentence."

def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def join_words(words: Sequence[str], conjunction: str = "and") -> str:
    """["red", "green", "blue"] -> "red, green and blue"."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {conjunction} {words[-1]}"


def corner_name(row: int, col: int, grid: int) -> str | None:
    """"top-left corner" etc. for the four corner cells, else None."""
    vertical = "top" if row == 0 else "bottom" if row == grid - 1 else None
    horizontal = "left" if col == 0 else "right" if col == grid - 1 else None
    return f"{vertical}-{horizontal} corner" if vertical and horizontal else None


def cell_phrase(row: int, col: int) -> str:
    """The 1-based name of a cell: "row 2, column 3"."""
    return f"row {row + 1}, column {col + 1}"


def position_phrase(rng: np.random.Generator, row: int, col: int, grid: int) -> str:
    """A 1-based description of a cell: "row 2, column 3", or for corners half the time "the top-left corner"."""
    corner = corner_name(row, col, grid)
    if corner is not None and rng.random() < 0.5:
        return f"the {corner}"
    return cell_phrase(row, col)


def relation_holds(relation: str, a_row: int, a_col: int, b_row: int, b_col: int) -> bool:
    """Whether "a is <relation> b" is true on the grid (rows grow downwards)."""
    return {
        "left": a_col < b_col,
        "right": a_col > b_col,
        "above": a_row < b_row,
        "below": a_row > b_row,
    }[relation]


def choice(rng: np.random.Generator, items: Sequence):
    """Uniform pick from a non-empty sequence (numpy's `choice` would turn tuples into arrays)."""
    return items[int(rng.integers(len(items)))]
