"""The embedded default's data: a synthetic visual question-answering task that needs the image.

Scenes are 2-5 coloured shapes (colour, shape, size) in distinct cells of a 4x4 grid on 64-px images, so with
a 16-px patch every cell is exactly one ViT patch. Questions (count / exists / attribute / relation) are
generated with a program and only when every referenced object is unique, so answers are checkable from the
scene metadata. Everything is a deterministic function of `SyntheticConfig` (`data.synthetic`).

    paths = generate("data/synthetic", SyntheticConfig())   # idempotent; see SyntheticPaths
    image, labels = labelled_scene(rng, spec)                # on-the-fly dense labels for the vision tower
"""

from vir.data.synthetic.captions import caption, text_only_qa
from vir.data.synthetic.writer import (
    GENERATOR_VERSION,
    SyntheticPaths,
    as_spec,
    corpus_texts,
    generate,
    load_scenes,
    spec_hash,
)
from vir.data.synthetic.language import accuracy_by_type, exact_match, normalize_answer
from vir.data.synthetic.questions import QUESTION_TYPES, Question, make_question
from vir.data.synthetic.scene import (
    PALETTE,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    cell_labels,
    labelled_scene,
    render_scene,
    sample_scene,
)
from vir.data.synthetic.splits import BROKEN_KINDS, SPLITS, plan_splits
from vir.utils.config_schema import SyntheticConfig

__all__ = [
    "BROKEN_KINDS",
    "GENERATOR_VERSION",
    "PALETTE",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Question",
    "Scene",
    "SceneObject",
    "SyntheticConfig",
    "SyntheticPaths",
    "accuracy_by_type",
    "as_spec",
    "caption",
    "cell_labels",
    "corpus_texts",
    "exact_match",
    "generate",
    "labelled_scene",
    "load_scenes",
    "make_question",
    "normalize_answer",
    "plan_splits",
    "render_scene",
    "sample_scene",
    "spec_hash",
    "text_only_qa",
]
