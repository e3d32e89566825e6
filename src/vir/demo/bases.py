"""The embedded default's own base models: a tiny "pretrained" CLIP tower and Llama, built from scratch.

Nothing downloads here, yet the LLaVA recipe wants a pretrained vision tower and LLM. `build_bases` makes
both on the synthetic data and saves them as ordinary local HF directories, which the recipe then reads
through `model.vision_tower.path` and `model.llm.path` exactly as it reads a user's CLIP-ViT-L/336 and
Llama-3 directories; nothing downstream knows they were made here.

    llm_dir, clip_dir = build_bases(cfg.demo.bases.output_dir, cfg)   # idempotent: a finished base is reused

With `demo.bases.source` it starts from finished bases instead (`vir:demo/assets/bases/local_debug` ships the ones the
embedded default uses, built by this module on a GPU): they are copied under `root` and checked against the
config's fingerprints, so a shipped base is only ever used for the inputs it was trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any, Optional, Tuple

from vir.demo.common import PACKAGE_PREFIX, PRETRAIN_METRICS_FILE, as_dataclass, saved_fingerprint
from vir.demo.config import BasesConfig, LLMPretrainConfig, SyntheticConfig
from vir.demo.llm_base import pretrain_llm
from vir.demo.scene_text import grid_token_words, grid_tokens, scene_caption_examples, scene_qa_examples
from vir.demo.synthetic import as_spec, corpus_texts, generate
from vir.demo.synthetic.questions import AUX_QUESTION_TYPES, QUESTION_TYPES
from vir.demo.synthetic.splits import check_question_mix
from vir.demo.vision_base import pretrain_vision_tower
from vir.training.distributed import main_process_first
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

CLIP_SUBDIR = "clip"
LLM_SUBDIR = "llm"
# Seed streams of the LLM's scene documents: training, held-out evaluation and captions never share draws.
_QA_TRAIN_STREAM, _QA_EVAL_STREAM, _CAPTION_STREAM = 10, 11, 12


def build_bases(root: PathLike, cfg: Any, tokenizer_dir: Optional[PathLike] = None) -> Tuple[Path, Path]:
    """Pretrain (or reuse) the CLIP tower under `root/clip` and the Llama under `root/llm`; return
    `(llm_dir, clip_dir)`, ready for `model.llm.path` / `model.vision_tower.path`.

    `cfg` is the composed config: sizes come from `model.vision_tower` / `model.llm`, data from
    `demo.synthetic`, budgets from `demo.bases`. The Llama's vocabulary is the synthetic data set's tokenizer:
    `tokenizer_dir`, else the `tokenizer/` of the data set at `data.image_folder` (generated when missing;
    `generate` returns at once when it is already there).

    Under torchrun every process must call it: both bases train data-parallel (HF's Trainer), the first process
    writes them.
    """
    root = Path(root)
    spec = as_spec(cfg.demo.synthetic)
    bases = as_dataclass(BasesConfig, cfg.demo.bases)
    qa_spec = base_qa_spec(spec, bases.llm)  # a bad demo.bases.llm.question_mix fails before any training
    if tokenizer_dir is None:
        if not cfg.data.image_folder:
            raise ValueError("build_bases needs the synthetic tokenizer: set data.image_folder to the synthetic data "
                             "set's root (or pass tokenizer_dir)")
        with main_process_first():
            tokenizer_dir = generate(cfg.data.image_folder, spec).tokenizer
    clip_dir, llm_dir = root / CLIP_SUBDIR, root / LLM_SUBDIR
    if bases.source:
        with main_process_first():
            copy_bases(resolve_source(bases.source), root)
    pretrain_vision_tower(clip_dir, spec, cfg.model.vision_tower, bases.vision, source=bases.source)
    llm_cfg = bases.llm
    corpus = corpus_texts(spec)
    if llm_cfg.corpus_documents is not None:  # an even subsample, deterministic
        step = max(1, len(corpus) // max(1, llm_cfg.corpus_documents))
        corpus = corpus[::step][: llm_cfg.corpus_documents]
    documents = corpus + [
        example["messages"]
        for example in scene_qa_examples(qa_spec, llm_cfg.num_scene_qa, llm_cfg.seed, _QA_TRAIN_STREAM,
                                         turns=llm_cfg.scene_qa_turns, scene_format=llm_cfg.scene_format)
    ] + scene_caption_examples(spec, llm_cfg.num_scene_captions, llm_cfg.seed, _CAPTION_STREAM,
                               scene_format=llm_cfg.scene_format)
    eval_examples = scene_qa_examples(spec, llm_cfg.eval_size, llm_cfg.seed, _QA_EVAL_STREAM,
                                      scene_format=llm_cfg.scene_format)
    grid = llm_cfg.scene_format == "grid"
    pretrain_llm(llm_dir, tokenizer_dir, documents, cfg.model.llm, llm_cfg, eval_examples=eval_examples,
                 extra_tokens=grid_tokens(spec) if grid else (),
                 token_words=grid_token_words(spec) if grid else None, source=bases.source)
    logger.info("base models ready: model.llm.path=%s model.vision_tower.path=%s", llm_dir, clip_dir)
    return llm_dir, clip_dir


def base_qa_spec(spec: SyntheticConfig, llm_cfg: LLMPretrainConfig) -> SyntheticConfig:
    """`spec` with the question mix the LLM base's scene-QA training documents draw from (`demo.bases.llm.question_mix`,
    when set)."""
    if not llm_cfg.question_mix:
        return spec
    check_question_mix(llm_cfg.question_mix, "demo.bases.llm.question_mix", [*QUESTION_TYPES, *AUX_QUESTION_TYPES])
    return dataclasses.replace(spec, question_mix=dict(llm_cfg.question_mix))


def resolve_source(source: str) -> Path:
    """`demo.bases.source` as a directory: `vir:PATH` lies inside the installed `vir` package, anything else is a
    filesystem path. It must hold `clip/` and `llm/` finished bases (each with its `pretrain_metrics.json`)."""
    if source.startswith(PACKAGE_PREFIX):
        path = Path(__file__).resolve().parents[1] / source[len(PACKAGE_PREFIX):]
    else:
        path = Path(source)
    missing = [sub for sub in (CLIP_SUBDIR, LLM_SUBDIR) if not (path / sub / PRETRAIN_METRICS_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"demo.bases.source={source}: {path} holds no finished {' / '.join(missing)} base "
                                f"(want {CLIP_SUBDIR}/ and {LLM_SUBDIR}/ with {PRETRAIN_METRICS_FILE}, as a run's bases/ "
                                "has); set demo.bases.source=null to train the bases here")
    return path


def copy_bases(source: Path, root: Path) -> None:
    """Copy `source`'s `clip/` and `llm/` under `root`, each unless `root` already holds the same fingerprint."""
    for sub in (CLIP_SUBDIR, LLM_SUBDIR):
        held = saved_fingerprint(root / sub)
        if held == saved_fingerprint(source / sub):
            continue
        if (root / sub).exists():
            logger.warning("replacing the base at %s (fingerprint %s) with the one from %s", root / sub, held, source)
        shutil.rmtree(root / sub, ignore_errors=True)
        shutil.copytree(source / sub, root / sub)
        logger.info("base %s copied from %s", root / sub, source / sub)
