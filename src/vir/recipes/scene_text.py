"""Text-only documents for the tiny LLM: the data set's conversations and "scene description -> QA" ones.

A scene-QA document puts the scene's caption exactly where LLaVA puts the image block: the user turn is
`"{description}\\n{question}"`, as a synthetic record's is `"<image>\\n{question}"`. So before the LLM ever
sees an image it has learnt to answer count / exists / attribute / relation questions from a reading-order
list of objects with their rows and columns, the same information the frozen tower's patch features carry.
Relation sentences are cut from these descriptions: a stated relation would let the model copy an answer
that it must compute from rows and columns once the description is an image.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Union

import numpy as np

from vir.data.conversation import Message
from vir.data.synthetic import caption, make_question, sample_scene
from vir.data.synthetic.language import RELATION_PHRASES
from vir.utils.config_schema import SyntheticConfig

Document = Union[str, Sequence[Union[Message, Mapping[str, str]]]]

_RELATION_SENTENCE = re.compile(
    r" The [a-z]+ [a-z]+ is (?:" + "|".join(RELATION_PHRASES.values()) + r") the [a-z]+ [a-z]+\."
)


def to_messages(document: Document) -> List[Message]:
    """A document as chat messages: a `corpus_texts` string ("turn\\nturn\\n...", user first, alternating)
    or a list of `Message`s / `{role, content}` dicts (returned as `Message`s)."""
    if isinstance(document, str):
        turns = document.split("\n")
        return [Message("user" if k % 2 == 0 else "assistant", turn) for k, turn in enumerate(turns)]
    return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in document]


def scene_description(rng: np.random.Generator, scene) -> str:
    """The stage-1 caption of `scene` without its relation sentences: object count, then every object's
    size, colour, shape, row and column in reading order."""
    return _RELATION_SENTENCE.sub("", caption(rng, scene))


def scene_qa_examples(spec: SyntheticConfig, n: int, seed: int, stream: int) -> List[Dict]:
    """`n` text-only QA examples on fresh scenes, question types drawn from `spec.question_mix`.

    Each is `{"messages": [user, assistant], "question_type", "answer"}`; the user turn is
    `"{scene_description}\\n{question}"`, the assistant turn the reference answer.
    """
    rng = np.random.default_rng([seed, spec.seed, stream])
    types = [t for t, w in spec.question_mix.items() if w > 0]
    weights = np.array([spec.question_mix[t] for t in types], dtype=np.float64)
    examples = []
    while len(examples) < n:
        question_type = types[int(rng.choice(len(types), p=weights / weights.sum()))]
        scene = sample_scene(rng, spec)
        question = make_question(rng, scene, question_type, spec)
        if question is None:  # the scene cannot support this type (e.g. no uniquely named pair)
            continue
        user = f"{scene_description(rng, scene)}\n{question.text}"
        examples.append({
            "messages": [Message("user", user), Message("assistant", question.answer)],
            "question_type": question_type,
            "answer": question.answer,
        })
    return examples
