"""Questions about a scene, each with a machine-checkable program and one well-defined answer.

Four types: `count` (objects of a colour), `exists` (colour+shape, "no" only for near misses), `attribute`
(colour/shape/size of a uniquely named or positioned object) and `relation` (between two uniquely named
objects). A fifth, `locate` ("Where is the red circle?" -> "row 2, column 3"), is a training-only
sub-skill (`train_locate_fraction`): it reads out the position that attribute-at and relation questions
need, and eval/test never ask it. A question that names an object is only generated when the name picks
exactly one object. The answer style follows from the question text alone: questions ending in
`SENTENCE_SUFFIX` get a sentence, all others one word.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from vir.demo.config import SyntheticConfig
from vir.demo.synthetic.language import (
    RELATION_PHRASES,
    RELATIONS,
    SENTENCE_SUFFIX,
    cell_phrase,
    choice,
    number_word,
    position_phrase,
    relation_holds,
)
from vir.demo.synthetic.scene import Scene, SceneObject

QUESTION_TYPES = ("count", "exists", "attribute", "relation")  # what eval/test ask, in `question_mix`
AUX_QUESTION_TYPES = ("locate",)  # training-only sub-skills
MAX_TARGET_COUNT = 3  # count answers are drawn uniformly from 0..3 so "one" is not a free majority answer


@dataclass(frozen=True)
class Question:
    """`program` names the operation and its arguments (0-based rows/cols) so answers can be recomputed."""

    question_type: str
    text: str
    answer: str  # the exact reference (a word, or a sentence when the text ends in SENTENCE_SUFFIX)
    short_answer: str  # the one-word answer, whatever the style
    program: Dict[str, Any] = field(default_factory=dict)


def make_question(
    rng: np.random.Generator, scene: Scene, question_type: str, spec: SyntheticConfig, strict: bool = False
) -> Optional[Question]:
    """One question of `question_type` about `scene`, or None when the scene cannot support it.

    With `strict`, a drawn target answer (the count, yes/no) that this scene cannot give returns None so the
    caller resamples the scene; that keeps answer distributions flat instead of scene-dependent.
    """
    sentence = bool(rng.random() < spec.sentence_answer_fraction)
    return _GENERATORS[question_type](rng, scene, spec, sentence, strict)


def _finish(question_type: str, text: str, sentence: bool, short: str, long: str, program: Dict) -> Question:
    if sentence:
        return Question(question_type, text + SENTENCE_SUFFIX, long, short, program)
    return Question(question_type, text, short, short, program)


def _count(rng, scene: Scene, spec, sentence, strict) -> Optional[Question]:
    counts = Counter(o.colour for o in scene.objects)
    target = int(rng.integers(min(MAX_TARGET_COUNT, spec.max_objects) + 1))
    candidates = [c for c in spec.colours if counts[c] == target]
    if not candidates:
        if strict:
            return None
        candidates = list(spec.colours)
    colour = choice(rng, candidates)
    n = counts[colour]
    text = choice(rng, ("How many {c} objects are there?", "How many {c} objects are in the image?",
                        "Count the {c} objects.")).format(c=colour)
    if n == 0:
        long = f"There are no {colour} objects."
    elif n == 1:
        long = f"There is one {colour} object."
    else:
        long = f"There are {number_word(n)} {colour} objects."
    return _finish("count", text, sentence, number_word(n), long, {"op": "count_colour", "colour": colour})


def _exists(rng, scene: Scene, spec, sentence, strict) -> Optional[Question]:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = choice(rng, sorted(present))
    else:
        colours = sorted({o.colour for o in scene.objects}, key=spec.colours.index)
        shapes = sorted({o.shape for o in scene.objects}, key=spec.shapes.index)
        # Hardest "no": colour and shape both in the scene, never together (needs binding, not a colour check).
        bound = [(c, s) for c in colours for s in shapes if (c, s) not in present]
        near = [(c, s) for c in colours for s in spec.shapes if (c, s) not in present]
        near += [(c, s) for c in spec.colours for s in shapes if (c, s) not in present and c not in colours]
        pool = bound if bound and rng.random() < 0.5 else near
        if not pool:
            return None
        colour, shape = choice(rng, pool)
    yes = (colour, shape) in present
    text = choice(rng, ("Is there a {c} {s}?", "Is there a {c} {s} in the image?",
                        "Does the image contain a {c} {s}?")).format(c=colour, s=shape)
    long = f"Yes, there is a {colour} {shape}." if yes else f"No, there is no {colour} {shape}."
    program = {"op": "exists", "colour": colour, "shape": shape}
    return _finish("exists", text, sentence, "yes" if yes else "no", long, program)


def _attribute(rng, scene: Scene, spec, sentence, strict) -> Optional[Question]:
    shape_counts = Counter(o.shape for o in scene.objects)
    colour_counts = Counter(o.colour for o in scene.objects)
    name_counts = Counter(o.name for o in scene.objects)
    by_shape = [o for o in scene.objects if shape_counts[o.shape] == 1]
    by_colour = [o for o in scene.objects if colour_counts[o.colour] == 1]
    by_name = [o for o in scene.objects if name_counts[o.name] == 1]
    options: List[Callable[[], Question]] = [
        lambda: _attribute_at(rng, scene, choice(rng, scene.objects), "shape", sentence),
        lambda: _attribute_at(rng, scene, choice(rng, scene.objects), "colour", sentence),
    ]
    if by_shape:
        options.append(lambda: _colour_of_shape(rng, choice(rng, by_shape), sentence))
    if by_colour:
        options.append(lambda: _shape_of_colour(rng, choice(rng, by_colour), sentence))
    if by_name:
        options.append(lambda: _size_of(rng, choice(rng, by_name), sentence))
    return choice(rng, options)()


def _attribute_at(rng, scene: Scene, obj: SceneObject, attribute: str, sentence) -> Question:
    where = position_phrase(rng, obj.row, obj.col, scene.grid)
    program = {"op": f"{attribute}_at", "row": obj.row, "col": obj.col}
    if attribute == "shape":
        text = choice(rng, ("What shape is in {w}?", "Which shape is in {w}?")).format(w=where)
        long = f"The object in {where} is a {obj.shape}."
        return _finish("attribute", text, sentence, obj.shape, long, program)
    text = choice(rng, ("What colour is the object in {w}?", "Which colour does the object in {w} have?"))
    long = f"The object in {where} is {obj.colour}."
    return _finish("attribute", text.format(w=where), sentence, obj.colour, long, program)


def _colour_of_shape(rng, obj: SceneObject, sentence) -> Question:
    text = choice(rng, ("What colour is the {s}?", "Which colour does the {s} have?")).format(s=obj.shape)
    program = {"op": "colour_of_shape", "shape": obj.shape}
    return _finish("attribute", text, sentence, obj.colour, f"The {obj.shape} is {obj.colour}.", program)


def _shape_of_colour(rng, obj: SceneObject, sentence) -> Question:
    text = choice(rng, ("What shape is the {c} object?", "Which shape is {c}?")).format(c=obj.colour)
    program = {"op": "shape_of_colour", "colour": obj.colour}
    long = f"The {obj.colour} object is a {obj.shape}."
    return _finish("attribute", text, sentence, obj.shape, long, program)


def _size_of(rng, obj: SceneObject, sentence) -> Question:
    text = choice(rng, ("What size is the {n}?", "Is the {n} small or large?")).format(n=obj.name)
    program = {"op": "size_of", "colour": obj.colour, "shape": obj.shape}
    return _finish("attribute", text, sentence, obj.size, f"The {obj.name} is {obj.size}.", program)


def _relation(rng, scene: Scene, spec, sentence, strict) -> Optional[Question]:
    named = scene.uniquely_named()
    pairs = [(a, b) for a in named for b in named if a is not b]
    if not pairs:
        return None
    # "Where is a relative to b?" only when exactly one relation holds (same row or same column).
    aligned = [(a, b) for a, b in pairs if a.row == b.row or a.col == b.col]
    if aligned and rng.random() < 0.5:
        a, b = choice(rng, aligned)
        relation = next(r for r in RELATIONS if relation_holds(r, a.row, a.col, b.row, b.col))
        text = choice(rng, ("Where is the {a} relative to the {b}?", "Where is the {a} compared to the {b}?"))
        long = f"The {a.name} is {RELATION_PHRASES[relation]} the {b.name}."
        program = {"op": "relation_where", "a": _ref(a), "b": _ref(b)}
        return _finish("relation", text.format(a=a.name, b=b.name), sentence, relation, long, program)
    want_yes = bool(rng.random() < 0.5)
    triples = [(a, b, r) for a, b in pairs for r in RELATIONS
               if relation_holds(r, a.row, a.col, b.row, b.col) == want_yes]
    if not triples:
        return None
    a, b, relation = choice(rng, triples)
    phrase = RELATION_PHRASES[relation]
    text = f"Is the {a.name} {phrase} the {b.name}?"
    long = f"Yes, the {a.name} is {phrase} the {b.name}." if want_yes else (
        f"No, the {a.name} is not {phrase} the {b.name}.")
    program = {"op": "relation_yesno", "a": _ref(a), "b": _ref(b), "relation": relation}
    return _finish("relation", text, sentence, "yes" if want_yes else "no", long, program)


def _locate(rng, scene: Scene, spec, sentence, strict) -> Optional[Question]:
    named = scene.uniquely_named()
    if not named:
        return None
    obj = choice(rng, named)
    where = cell_phrase(obj.row, obj.col)
    text = choice(rng, ("Where is the {n}?", "In which row and column is the {n}?")).format(n=obj.name)
    program = {"op": "locate", "colour": obj.colour, "shape": obj.shape}
    return _finish("locate", text, sentence, where, f"The {obj.name} is in {where}.", program)


def _ref(obj: SceneObject) -> Dict[str, str]:
    return {"colour": obj.colour, "shape": obj.shape}


_GENERATORS = {"count": _count, "exists": _exists, "attribute": _attribute, "relation": _relation,
               "locate": _locate}
