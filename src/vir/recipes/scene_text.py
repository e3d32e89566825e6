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


def scene_qa_examples(spec: SyntheticConfig, n: int, seed: int, stream: int, turns: int = 1) -> List[Dict]:
    """`n` text-only QA conversations on fresh scenes, question types drawn from `spec.question_mix`.

    Each is `{"messages": [user, assistant, ...], "question_type", "answer"}` (type and answer of the first
    question). The first user turn is `"{scene_description}\n{question}"`; up to `turns - 1` follow-up
    questions about the same scene come as further user turns (distinct questions; one the scene cannot
    support is skipped), so one description, the long part, pays for several answers.
    """
    rng = np.random.default_rng([seed, spec.seed, stream])
    types = [t for t, w in spec.question_mix.items() if w > 0]
    weights = np.array([spec.question_mix[t] for t in types], dtype=np.float64)
    weights /= weights.sum()
    examples = []
    while len(examples) < n:
        scene = sample_scene(rng, spec)
        questions = []
        for question_type in (types[int(k)] for k in rng.choice(len(types), size=turns, p=weights)):
            question = make_question(rng, scene, question_type, spec)
            # None: the scene cannot support this type (e.g. no uniquely named pair).
            if question is not None and all(question.text != q.text for q in questions):
                questions.append(question)
        if not questions:
            continue
        messages = [Message("user", f"{scene_description(rng, scene)}\n{questions[0].text}")]
        for k, question in enumerate(questions):
            messages += [Message("user", question.text)] if k else []
            messages.append(Message("assistant", question.answer))
        examples.append({"messages": messages, "question_type": questions[0].question_type,
                         "answer": questions[0].answer})
    return examples
