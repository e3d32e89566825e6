"""Answer scoring: normalised exact match, overall and per question type. The one scorer of the project:
`vir-eval`, the training-time sample visualiser and the demo's base recipes all call it."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, List, Sequence

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_answer(text: str) -> str:
    """Lower-case, turn punctuation into spaces, collapse whitespace: "There are Two." -> "there are two"."""
    return " ".join(_NON_ALNUM.sub(" ", text.lower()).split())


def exact_match(pred: str, ref: str) -> bool:
    """Exact match after `normalize_answer` on both sides."""
    return normalize_answer(pred) == normalize_answer(ref)


def accuracy_by_type(predictions: Sequence[str], references: Sequence[str],
                     question_types: Sequence[str]) -> Dict[str, Dict[str, float]]:
    """`{type: {"accuracy", "n"}}` (types sorted) by exact match; the three sequences align by position."""
    if not len(predictions) == len(references) == len(question_types):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references and "
                         f"{len(question_types)} question types")
    hits: Dict[str, List[bool]] = defaultdict(list)
    for pred, ref, kind in zip(predictions, references, question_types):
        hits[kind].append(exact_match(pred, ref))
    return {kind: {"accuracy": sum(v) / len(v), "n": len(v)} for kind, v in sorted(hits.items())}


def overall_accuracy(per_type: Dict[str, Dict[str, float]]) -> float:
    """The accuracy over every item of `accuracy_by_type`'s result (0.0 when it is empty)."""
    n = sum(row["n"] for row in per_type.values())
    return sum(row["accuracy"] * row["n"] for row in per_type.values()) / n if n else 0.0
