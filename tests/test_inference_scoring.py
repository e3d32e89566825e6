"""The one scorer: normalised exact match, overall and per question type."""

from __future__ import annotations

import pytest

from vir.inference.scoring import accuracy_by_type, exact_match, normalize_answer, overall_accuracy


def test_normalize_and_exact_match():
    assert normalize_answer("  There are Two red objects. ") == "there are two red objects"
    assert exact_match("Yes.", "yes") and exact_match("top-left", "top left")
    assert not exact_match("two", "three") and not exact_match("2", "two")


def test_accuracy_by_type_and_overall():
    per_type = accuracy_by_type(["Two", "no", "yes"], ["two", "yes", "yes"], ["count", "exists", "exists"])
    assert per_type == {"count": {"accuracy": 1.0, "n": 1}, "exists": {"accuracy": 0.5, "n": 2}}
    assert overall_accuracy(per_type) == pytest.approx(2 / 3)
    assert overall_accuracy({}) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        accuracy_by_type(["a", "b"], ["a"], ["t"])
