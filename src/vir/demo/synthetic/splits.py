"""Plan every split's records and scenes from the spec alone (no rendering, no disk), deterministically.

Each split draws from its own stream, `np.random.default_rng([seed, split_stream])`, so eval and test never
share a seed with train; they also skip any scene already used by an earlier split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from vir.demo.config import SyntheticConfig
from vir.demo.synthetic.captions import CAPTION_INSTRUCTIONS, caption, text_only_qa
from vir.demo.synthetic.language import choice
from vir.demo.synthetic.questions import AUX_QUESTION_TYPES, QUESTION_TYPES, Question, make_question
from vir.demo.synthetic.scene import Scene, check_spec, sample_scene

SPLITS = ("stage1", "train", "eval", "test")
_SPLIT_STREAM = {"stage1": 1, "train": 2, "eval": 3, "test": 4, "broken": 5}
BROKEN_KINDS = ("truncated", "empty", "missing")
IMAGE_TOKEN = "<image>"
MAX_SCENE_TRIES = 10_000


@dataclass(frozen=True)
class PlannedImage:
    record_id: str
    path: str  # relative to the data root, as in the records' "image"
    scene: Scene
    broken: Optional[str] = None  # one of BROKEN_KINDS


@dataclass
class SplitPlan:
    name: str
    records: List[dict] = field(default_factory=list)
    images: List[PlannedImage] = field(default_factory=list)
    question_types: Counter = field(default_factory=Counter)
    multi_turn: int = 0
    text_only: int = 0
    captions: int = 0


def split_rng(spec: SyntheticConfig, split: str) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_STREAM[split]])


def plan_splits(spec: SyntheticConfig, splits=SPLITS) -> Dict[str, SplitPlan]:
    """Plans for `splits` (in SPLITS order; eval/test exclude the scenes of every split planned before)."""
    check_spec(spec)
    check_mix(spec)
    seen: Set[Tuple] = set()
    plans = {}
    for split in SPLITS:
        if split not in splits:
            continue
        if split == "stage1":
            plans[split] = plan_stage1(spec)
        elif split == "train":
            plans[split] = plan_train(spec)
        else:
            plans[split] = plan_single_turn(spec, split, spec.num_eval if split == "eval" else spec.num_test, seen)
        seen.update(image.scene.key() for image in plans[split].images)
    return plans


def check_mix(spec: SyntheticConfig) -> None:
    check_question_mix(spec.question_mix, "demo.synthetic.question_mix", QUESTION_TYPES)
    if not 0 <= spec.train_locate_fraction < 1:
        raise ValueError(f"demo.synthetic.train_locate_fraction={spec.train_locate_fraction}: must be in [0, 1)")


def check_question_mix(mix: Dict[str, float], key: str, allowed) -> None:
    """A {question type: weight} mix (config `key`) draws only `allowed` types, with weights >=0 summing >0."""
    mix = dict(mix)
    if set(mix) - set(allowed) or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"{key}={mix}: keys must be among {allowed}, weights >=0, sum >0")


def plan_stage1(spec: SyntheticConfig) -> SplitPlan:
    """Caption records: human `<image>\\n<short instruction>`, gpt the caption."""
    rng = split_rng(spec, "stage1")
    plan = SplitPlan("stage1")
    for i in range(spec.num_stage1):
        record_id, path = f"stage1_{i:06d}", f"images/stage1_{i:06d}.png"
        record, scene = _caption_record(rng, spec, record_id, path)
        plan.records.append(record)
        plan.images.append(PlannedImage(record_id, path, scene))
    return plan


def _caption_record(rng: np.random.Generator, spec: SyntheticConfig, record_id: str, path: str) -> Tuple[dict, Scene]:
    scene = sample_scene(rng, spec)
    human = f"{IMAGE_TOKEN}\n{choice(rng, CAPTION_INSTRUCTIONS)}"
    return {"id": record_id, "image": path, "conversations": _turns([(human, caption(rng, scene))])}, scene


def plan_train(spec: SyntheticConfig) -> SplitPlan:
    """Single- and multi-turn Q/A records, `text_only_fraction` without image, `caption_fraction` captions
    (LLaVA-665k style: some caption data beside the questions), `num_broken` broken images."""
    rng = split_rng(spec, "train")
    n = spec.num_train
    text_only = set(rng.choice(n, size=min(n, round(spec.text_only_fraction * n)), replace=False).tolist())
    with_image = [i for i in range(n) if i not in text_only]
    num_captions = min(len(with_image), round(spec.caption_fraction * n))
    captions = set(rng.choice(with_image, size=num_captions, replace=False).tolist()) if num_captions else set()
    broken_rng = split_rng(spec, "broken")
    broken_idx = broken_rng.choice(with_image, size=min(spec.num_broken, len(with_image)), replace=False)
    broken = {int(i): BROKEN_KINDS[k % len(BROKEN_KINDS)] for k, i in enumerate(sorted(broken_idx.tolist()))}
    types, weights = _train_mix(spec)
    plan = SplitPlan("train")
    for i in range(n):
        record_id = f"train_{i:06d}"
        if i in text_only:
            question, answer = text_only_qa(rng, spec)
            plan.records.append({"id": record_id, "conversations": _turns([(question, answer)])})
            plan.text_only += 1
            continue
        if i in captions:
            record, scene = _caption_record(rng, spec, record_id, f"images/train_{i:06d}.png")
            plan.records.append(record)
            plan.images.append(PlannedImage(record_id, record["image"], scene, broken.get(i)))
            plan.captions += 1
            continue
        num_turns = 1
        if rng.random() < spec.multi_turn_fraction:
            num_turns = int(rng.integers(2, max(2, spec.max_turns) + 1))
        wanted = [types[j] for j in rng.choice(len(types), size=num_turns, p=weights)]
        scene, questions = scene_with_questions(rng, spec, wanted)
        path = f"images/train_{i:06d}.png"
        pairs = [(q.text, q.answer) for q in questions]
        pairs[0] = (f"{IMAGE_TOKEN}\n{pairs[0][0]}", pairs[0][1])
        plan.records.append({"id": record_id, "image": path, "conversations": _turns(pairs)})
        plan.images.append(PlannedImage(record_id, path, scene, broken.get(i)))
        plan.question_types.update(q.question_type for q in questions)
        plan.multi_turn += len(questions) > 1
    return plan


def plan_single_turn(spec: SyntheticConfig, split: str, n: int, exclude: Set[Tuple]) -> SplitPlan:
    """Clean single-turn records whose question types follow `question_mix` exactly (largest-remainder quotas),
    with `question_type`, `answer`, `short_answer` and `program` on every record for scoring."""
    rng = split_rng(spec, split)
    plan = SplitPlan(split)
    for i, question_type in enumerate(_quota_types(rng, spec, n)):
        scene, (question,) = scene_with_questions(rng, spec, [question_type], exclude)
        record_id, path = f"{split}_{i:06d}", f"images/{split}_{i:06d}.png"
        plan.records.append({
            "id": record_id,
            "image": path,
            "conversations": _turns([(f"{IMAGE_TOKEN}\n{question.text}", question.answer)]),
            "question_type": question.question_type,
            "answer": question.answer,
            "short_answer": question.short_answer,
            "program": question.program,
        })
        plan.images.append(PlannedImage(record_id, path, scene))
        plan.question_types[question_type] += 1
    return plan


def scene_with_questions(
    rng: np.random.Generator, spec: SyntheticConfig, question_types: List[str], exclude: Set[Tuple] = frozenset()
) -> Tuple[Scene, List[Question]]:
    """A fresh scene (not in `exclude`) that supports the first type's drawn target exactly, plus follow-up
    questions of the other types (distinct programs; a type the scene cannot support is skipped)."""
    # The first question's own draws (style, target count, yes/no) are fixed before any scene is tried, so
    # rejection only resamples the scene: redrawing the target too would favour easy answers ("zero").
    intent = int(rng.integers(2**63))
    for _ in range(MAX_SCENE_TRIES):
        scene = sample_scene(rng, spec)
        if scene.key() in exclude:
            continue
        first = make_question(np.random.default_rng(intent), scene, question_types[0], spec, strict=True)
        if first is not None:
            break
    else:
        raise RuntimeError(f"no scene supports a {question_types[0]!r} question; check demo.synthetic")
    questions = [first]
    for question_type in question_types[1:]:
        for _ in range(4):
            follow_up = make_question(rng, scene, question_type, spec)
            if follow_up is not None and all(follow_up.program != q.program for q in questions):
                questions.append(follow_up)
                break
    return scene, questions


def _mix(spec: SyntheticConfig) -> Tuple[List[str], np.ndarray]:
    types = [t for t in QUESTION_TYPES if spec.question_mix.get(t, 0) > 0]
    weights = np.array([spec.question_mix[t] for t in types], dtype=np.float64)
    return types, weights / weights.sum()


def _train_mix(spec: SyntheticConfig) -> Tuple[List[str], np.ndarray]:
    """`question_mix`, with `train_locate_fraction` of the questions moved to the training-only `locate`."""
    types, weights = _mix(spec)
    if spec.train_locate_fraction <= 0:
        return types, weights
    (locate,) = AUX_QUESTION_TYPES
    return types + [locate], np.append(weights * (1 - spec.train_locate_fraction), spec.train_locate_fraction)


def _quota_types(rng: np.random.Generator, spec: SyntheticConfig, n: int) -> List[str]:
    types, weights = _mix(spec)
    raw = weights * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[j] += 1
    sequence = [t for t, c in zip(types, counts) for _ in range(c)]
    return [sequence[j] for j in rng.permutation(n)]


def _turns(pairs: List[Tuple[str, str]]) -> List[Dict[str, str]]:
    turns = []
    for human, gpt in pairs:
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return turns
