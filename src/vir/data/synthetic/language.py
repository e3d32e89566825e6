"""Words shared by questions, captions and scoring: numbers, positions, relations, answer normalisation."""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Sequence

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

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


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


def normalize_answer(text: str) -> str:
    """Lower-case, turn punctuation into spaces, collapse whitespace: "There are Two." -> "there are two"."""
    return " ".join(_NON_ALNUM.sub(" ", text.lower()).split())


def exact_match(pred: str, ref: str) -> bool:
    """Exact match after `normalize_answer` on both sides."""
    return normalize_answer(pred) == normalize_answer(ref)


def accuracy_by_type(predictions: Iterable[str], records: Iterable[Mapping]) -> Dict[str, float]:
    """Exact-match accuracy per `question_type` of eval/test records (and "overall"), aligned by position."""
    hits: Dict[str, List[bool]] = {}
    for pred, record in zip(predictions, records, strict=True):
        ok = exact_match(pred, record["answer"])
        hits.setdefault(record["question_type"], []).append(ok)
        hits.setdefault("overall", []).append(ok)
    return {key: sum(v) / len(v) for key, v in sorted(hits.items())}
