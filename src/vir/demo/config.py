"""The embedded demo's config section, `demo.*`: its synthetic data, its base-model recipes and its stage 1.

Registered beside the library's schema through the `vir.config_sections` entry point (pyproject.toml), so
`demo.*` keys are typed and checked like every other key, while the library never imports this module. A
user's own run leaves `demo` null.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from vir.utils.config_schema import TrainingConfig


@dataclass
class SyntheticConfig:
    """The embedded default's synthetic VQA data set (`vir.demo.synthetic`): scenes of coloured shapes on a
    `grid` x `grid` layout that can only be answered by looking. Sizes fit a <=15-minute 2-core CPU run."""

    seed: int = 0
    image_size: int = 64
    grid: int = 4  # with a 16-px patch on 64 px, one grid cell is exactly one ViT patch
    min_objects: int = 2
    max_objects: int = 5
    colours: List[str] = field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "white"]
    )
    shapes: List[str] = field(default_factory=lambda: ["circle", "square", "triangle", "cross"])
    jitter: int = 1  # max +-pixels an object moves inside its cell
    num_stage1: int = 10000  # caption records (stage-1 alignment)
    num_train: int = 20000  # instruction records, text-only and broken ones included
    num_eval: int = 500
    num_test: int = 1000
    multi_turn_fraction: float = 0.3  # train records with 2..max_turns Q/A turns about one image
    max_turns: int = 3
    text_only_fraction: float = 0.05
    caption_fraction: float = 0.0  # train records that ask for a caption (llama3 template), beside the Q/A
    num_broken: int = 3  # train records whose image is truncated, empty or missing (loader fallback)
    sentence_answer_fraction: float = 0.2  # questions that ask for a full-sentence answer
    # Train questions that ask where a named object is ("row 2, column 3"): a training-only sub-skill of the
    # attribute and relation questions; eval/test never ask it.
    train_locate_fraction: float = 0.0
    # Question-type mix; eval and test follow it exactly (quotas), train samples from it.
    question_mix: Dict[str, float] = field(
        default_factory=lambda: {"count": 0.25, "exists": 0.25, "attribute": 0.25, "relation": 0.25}
    )
    vocab_size: int = 512  # BPE tokenizer trained on the data set's text


@dataclass
class VisionPretrainConfig:
    """Dense pretraining of a from-scratch CLIP vision tower (`vir.demo.vision_base.pretrain_vision_tower`): a stand-in
    for CLIP's own pretraining when no pretrained tower exists. Linear heads read every patch of
    `hidden_states[select_layer]` and predict its cell's occupied/colour/shape/size and row/column."""

    max_steps: int = 400  # every head is ~100% held-out by ~300 steps at hidden 64-128, 2-3 layers
    max_seconds: Optional[float] = None  # wall-clock cap on training (eval excluded); null = max_steps only
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    bank_size: int = 4096  # training images rendered and normalised once, then reused (random order)
    eval_size: int = 512  # held-out images (their own seed stream) for per-head accuracy
    eval_every: int = 100
    seed: int = 0


@dataclass
class LLMPretrainConfig:
    """Causal-LM pretraining of a from-scratch Llama (`vir.demo.llm_base.pretrain_llm`) on the synthetic data set's
    text rendered with the Llama-3 chat template, plus text-only "scene -> question -> answer" documents so the
    LLM learns to answer questions about a scene it reads before it sees images. The embedded default
    (`experiment=local_debug`) trains it on grid-rendered scene QA and scene captions, at batch 16 and lr 3e-4,
    for 4500 steps, in length-grouped batches."""

    max_steps: int = 300  # the corpus loss flattens by ~250 steps (0.50 at 100, 0.40 at 200, 0.38 at 300)
    max_seconds: Optional[float] = None  # wall-clock cap on training (eval excluded); null = max_steps only
    batch_size: int = 32
    # Batches of similar length: each run of this many batches' documents is sorted by length first (1 = off).
    length_grouping: int = 1
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_length: int = 256  # tokens per document; longer ones are cut
    loss_on: str = "all"  # all (plain causal LM) | assistant (only what LLaVA's llama3 template trains)
    # Text-only scene QA documents (0 = none). 5000 description-format ones at lr 3e-3 for 300 steps taught the
    # answer format (~34% vs ~8% without), not the look-ups; 40000 grid-format ones at 3e-4 teach them (59% in
    # text after 2000 steps at batch 32, 67-72% after 4000 at batch 16).
    num_scene_qa: int = 5000
    scene_qa_turns: int = 4  # questions per scene-QA document (one description pays for several answers)
    # Question types of the scene-QA training documents, {type: weight} over `demo.synthetic.question_mix`'s
    # types and the training-only `locate`; empty = `demo.synthetic.question_mix`. Held-out scoring keeps that.
    # From the command line the keys are new, so Hydra wants `++demo.bases.llm.question_mix={count:1,exists:1}`.
    question_mix: Dict[str, float] = field(default_factory=dict)
    # How scene-QA documents render the scene (`vir.demo.scene_text`): `grid` (one added token per grid cell,
    # the tower's patch layout; the look-ups transfer to images) | `description` (the caption's sentences).
    scene_format: str = "grid"
    # Scene -> caption documents (`SceneCaption`: the scene in place of the image block, then the stage-1
    # caption, plain template). A base that captions the rendered scene lets stage 1 align the projector
    # against something it already reads; without them its stage-1 caption loss stays near 3.
    num_scene_captions: int = 0
    # The data set's own conversations (captions, questions without their images) in the corpus; null = all.
    corpus_documents: Optional[int] = None
    eval_size: int = 200  # held-out scene questions (same format) scored by exact match (0 = no eval)
    eval_every: int = 100
    seed: int = 0


@dataclass
class BasesConfig:
    """The embedded default's own "pretrained" CLIP tower and Llama (`vir.demo.bases.build_bases`), built from
    scratch on the synthetic data (or copied from `source`) and saved as local HF directories under
    `output_dir` (`clip/`, `llm/`), then consumed through `model.vision_tower.path` / `model.llm.path` like any
    downloaded checkpoint."""

    output_dir: str = "runs/bases"
    # Finished bases to start from instead of training them: a directory holding `clip/` and `llm/` (a former
    # run's `bases/`), or `vir:PATH` inside the installed package (`vir:demo/assets/bases/local_debug`, the ones
    # `make train` uses, built by `experiment=synthetic_gpu` on a GPU). They are copied to `output_dir` and
    # must match this config's fingerprints; a mismatch is an error, never a silent retraining.
    source: Optional[str] = None
    vision: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)
    llm: LLMPretrainConfig = field(default_factory=LLMPretrainConfig)


@dataclass
class DemoConfig:
    """`demo.*`: what the embedded default (`recipe.name=synthetic_llava`, `experiment=local_debug`) runs beside
    the library's `model` / `data` / `training` sections. Stage 2 is `training.*` itself."""

    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    bases: BasesConfig = field(default_factory=BasesConfig)
    # Stage 1: projector alignment on the synthetic captions (plain template), before `training.*`'s stage 2.
    stage1: TrainingConfig = field(
        default_factory=lambda: TrainingConfig(mode="stage1", learning_rate=1e-3, output_dir="stage1")
    )
    eval_split: str = "test"  # the split scored (with its blind twin) at the end of the run
