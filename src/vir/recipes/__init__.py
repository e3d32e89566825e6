"""Recipes that build the embedded default's own "pretrained" base models from scratch, offline.

    llm_dir, clip_dir = build_bases(cfg.bases.output_dir, cfg)
    # then model.llm.path=llm_dir model.vision_tower.path=clip_dir, as for downloaded Llama-3 / CLIP dirs

`pretrain_vision_tower` (dense per-patch heads on synthetic scenes) and `pretrain_llm` (causal LM on the
data set's text plus text-only QA on scenes rendered as grid tokens or descriptions) can also be run alone.
"""

from vir.recipes.bases import CLIP_SUBDIR, LLM_SUBDIR, build_bases
from vir.recipes.llm_base import answer_accuracy, build_llama, encode_document, init_from_words, pretrain_llm
from vir.recipes.scene_text import (
    GRID_EMPTY,
    SceneCaption,
    grid_token,
    grid_token_words,
    grid_tokens,
    scene_caption_examples,
    scene_description,
    scene_grid,
    scene_qa_examples,
    to_messages,
)
from vir.recipes.vision_base import DENSE_HEADS, build_clip_vision, dense_accuracy, pretrain_vision_tower

__all__ = [
    "CLIP_SUBDIR",
    "DENSE_HEADS",
    "GRID_EMPTY",
    "LLM_SUBDIR",
    "SceneCaption",
    "answer_accuracy",
    "build_bases",
    "build_clip_vision",
    "build_llama",
    "dense_accuracy",
    "encode_document",
    "grid_token",
    "grid_token_words",
    "grid_tokens",
    "init_from_words",
    "pretrain_llm",
    "pretrain_vision_tower",
    "scene_caption_examples",
    "scene_description",
    "scene_grid",
    "scene_qa_examples",
    "to_messages",
]
