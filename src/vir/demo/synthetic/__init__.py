"""The embedded default's data: a synthetic visual question-answering task that needs the image.

Scenes are 2-5 coloured shapes (colour, shape, size) in distinct cells of a 4x4 grid on 64-px images, so with
a 16-px patch every cell is exactly one ViT patch. Questions (count / exists / attribute / relation) are
generated with a program and only when every referenced object is unique, so answers are checkable from the
scene metadata. Everything is a deterministic function of `SyntheticConfig` (`demo.synthetic`).

    paths = generate("data/synthetic", SyntheticConfig())   # idempotent; see SyntheticPaths
    image, labels = labelled_scene(rng, spec)                # on-the-fly dense labels for the vision tower
"""

from vir.demo.config import SyntheticConfig
from vir.demo.synthetic.captions import caption, text_only_qa
from vir.demo.synthetic.questions import QUESTION_TYPES, Question, make_question
from vir.demo.synthetic.scene import (
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
from vir.demo.synthetic.splits import BROKEN_KINDS, SPLITS, plan_splits
from vir.demo.synthetic.writer import (
    GENERATOR_VERSION,
    SyntheticPaths,
    as_spec,
    corpus_texts,
    generate,
    load_scenes,
    spec_hash,
)

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
    "as_spec",
    "caption",
    "cell_labels",
    "corpus_texts",
    "generate",
    "labelled_scene",
    "load_scenes",
    "make_question",
    "plan_splits",
    "render_scene",
    "sample_scene",
    "spec_hash",
    "text_only_qa",
]
