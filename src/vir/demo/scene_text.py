"""Text-only documents for the tiny LLM: the data set's conversations, "scene -> QA" and "scene -> caption" ones.

A scene-QA document puts a text rendering of the scene exactly where LLaVA puts the image block: the user turn
is `"{scene}\\n{question}"`, as a synthetic record's is `"<image>\\n{question}"`. So before the LLM ever sees
an image it has learnt to answer count / exists / attribute / relation questions about a scene it reads.
Two renderings (`demo.bases.llm.scene_format`):

- `grid`: one token per grid cell in reading order (`<|grid_small_red_circle|>`, `<|grid_empty|>`), the
  layout of the tower's patch tokens: grid*grid tokens, cell k at position k of the block. The look-ups the
  task needs (find the cell that matches a name, read its neighbours' positions) are then the same in text
  and in the image, and stage 2 only has to make the projected patches read like these tokens.
- `description`: the stage-1 caption, a reading-order list of objects with their rows and columns, without
  its relation sentences (a stated relation would let the model copy an answer that it must compute from
  rows and columns once the description is an image).

A `SceneCaption` puts the same rendering where stage 1's image block goes (LLaVA's `plain` layout) and the
stage-1 caption after it, so the base writes captions of scenes it reads and stage 1's projector alignment has
a target the base already knows.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, NamedTuple, Sequence, Union

import numpy as np

from vir.data.conversation import Message
from vir.demo.config import SyntheticConfig
from vir.demo.synthetic import SIZES, caption, make_question, sample_scene
from vir.demo.synthetic.language import RELATION_PHRASES


class SceneCaption(NamedTuple):
    """A stage-1 style document: the scene's rendering in place of the image block, then its caption, laid out
    by LLaVA's `plain` template (bos, image block, caption, eos; the caption trained)."""

    scene: str
    caption: str


Document = Union[str, SceneCaption, Sequence[Union[Message, Mapping[str, str]]]]

_RELATION_SENTENCE = re.compile(
    r" The [a-z]+ [a-z]+ is (?:" + "|".join(RELATION_PHRASES.values()) + r") the [a-z]+ [a-z]+\."
)


def to_messages(document: Document) -> List[Message]:
    """A document as chat messages: a `corpus_texts` string ("turn\\nturn\\n...", user first, alternating),
    a list of `Message`s / `{role, content}` dicts (returned as `Message`s), or a `SceneCaption` (the scene as
    the user turn, the caption as the reply)."""
    if isinstance(document, SceneCaption):
        return [Message("user", document.scene), Message("assistant", document.caption)]
    if isinstance(document, str):
        turns = document.split("\n")
        return [Message("user" if k % 2 == 0 else "assistant", turn) for k, turn in enumerate(turns)]
    return [m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in document]


def scene_description(rng: np.random.Generator, scene) -> str:
    """The stage-1 caption of `scene` without its relation sentences: object count, then every object's
    size, colour, shape, row and column in reading order."""
    return _RELATION_SENTENCE.sub("", caption(rng, scene))


SCENE_FORMATS = ("grid", "description")
GRID_EMPTY = "<|grid_empty|>"


def grid_token(size: str, colour: str, shape: str) -> str:
    return f"<|grid_{size}_{colour}_{shape}|>"


def grid_tokens(spec: SyntheticConfig) -> List[str]:
    """Every token `scene_grid` can emit for scenes of `spec`: the empty cell, then size x colour x shape."""
    return [GRID_EMPTY] + [grid_token(z, c, s) for z in SIZES for c in spec.colours for s in spec.shapes]


def grid_token_words(spec: SyntheticConfig) -> Dict[str, str]:
    """The object tokens of `grid_tokens` -> the words each stands for ("small red circle"), for
    `pretrain_llm`'s embedding initialisation; the empty cell has none."""
    return {grid_token(z, c, s): f"{z} {c} {s}" for z in SIZES for c in spec.colours for s in spec.shapes}


def scene_grid(scene) -> str:
    """`scene` as grid*grid cell tokens in reading order, no separators (one token per tower patch)."""
    cells = [GRID_EMPTY] * (scene.grid * scene.grid)
    for obj in scene.objects:
        cells[obj.row * scene.grid + obj.col] = grid_token(obj.size, obj.colour, obj.shape)
    return "".join(cells)


def scene_caption_examples(spec: SyntheticConfig, n: int, seed: int, stream: int,
                           scene_format: str = "grid") -> List[SceneCaption]:
    """`n` `SceneCaption`s on fresh scenes: the scene rendered as `scene_format`, then the stage-1 caption the
    data set writes for such a scene (every object with its cell, up to two relations). A base that has read
    them captions grid tokens; stage 1 then aligns the projector by making the image caption the same way."""
    _check_format(scene_format)
    rng = np.random.default_rng([seed, spec.seed, stream])
    scenes = [sample_scene(rng, spec) for _ in range(n)]
    return [SceneCaption(render_scene(rng, scene, scene_format), caption(rng, scene)) for scene in scenes]


def render_scene(rng: np.random.Generator, scene, scene_format: str) -> str:
    """`scene` as `scene_grid` (`grid`) or `scene_description` (`description`, phrasing drawn from `rng`)."""
    _check_format(scene_format)
    return scene_grid(scene) if scene_format == "grid" else scene_description(rng, scene)


def _check_format(scene_format: str) -> None:
    if scene_format not in SCENE_FORMATS:
        raise ValueError(f"unknown scene format {scene_format!r} (demo.bases.llm.scene_format); "
                         f"choices: {list(SCENE_FORMATS)}")


def scene_qa_examples(spec: SyntheticConfig, n: int, seed: int, stream: int, turns: int = 1,
                      scene_format: str = "description") -> List[Dict]:
    """`n` text-only QA conversations on fresh scenes, question types drawn from `spec.question_mix`.

    Each is `{"messages": [user, assistant, ...], "question_type", "answer"}` (type and answer of the first
    question). The first user turn is `"{scene}\n{question}"`, the scene rendered as `scene_format` (`grid`:
    `scene_grid`, `description`: `scene_description`); up to `turns - 1` follow-up questions about the same
    scene come as further user turns (distinct questions; one the scene cannot support is skipped), so one
    rendering pays for several answers.
    """
    _check_format(scene_format)
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
        text = render_scene(rng, scene, scene_format)
        messages = [Message("user", f"{text}\n{questions[0].text}")]
        for k, question in enumerate(questions):
            messages += [Message("user", question.text)] if k else []
            messages.append(Message("assistant", question.answer))
        examples.append({"messages": messages, "question_type": questions[0].question_type,
                         "answer": questions[0].answer, "op": questions[0].program["op"]})
    return examples
