"""`recipe.name=single`: one training stage exactly as configured, on the user's own data and bases."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from omegaconf import DictConfig

from vir.inference.evaluate import EvalItem, evaluate_run, load_eval_items
from vir.inference.generate import generate_answers
from vir.models.builder import build_image_processor, build_tokenizer

logger = logging.getLogger(__name__)


def visualizer_for(cfg: DictConfig, num_samples: int) -> Tuple[List[EvalItem], Optional[Callable]]:
    """The first `num_samples` eval records and a `predict(model, samples)` for the sample visualiser."""
    if not num_samples or not cfg.data.eval_path:
        return [], None
    samples = load_eval_items(cfg.data.eval_path, cfg.data.image_folder)[:num_samples]
    tokenizer, image_processor = build_tokenizer(cfg.model), build_image_processor(cfg.model)

    def predict(model, items: List[EvalItem]) -> List[str]:
        return generate_answers(model, tokenizer, image_processor, [i.query for i in items],
                                template=cfg.data.template, image_aspect_ratio=cfg.data.image_aspect_ratio,
                                system_prompt=cfg.data.system_prompt, max_new_tokens=cfg.recipe.eval_max_new_tokens)

    return samples, predict


def run(cfg: DictConfig) -> dict:
    """Train as `training.*` says; when `data.test_path` is set, evaluate the run on it afterwards."""
    from vir.training.run import run_training

    samples, predict = visualizer_for(cfg, cfg.recipe.num_visualizer_samples)
    outcome = run_training(cfg, visualizer_samples=samples, predict=predict)
    result = {"output_dir": str(outcome.output_dir), "steps": outcome.global_step, "train_loss": outcome.train_loss}
    if cfg.data.test_path:
        result.update(evaluate_run(Path(cfg.training.output_dir), split="test",
                                   max_new_tokens=cfg.recipe.eval_max_new_tokens,
                                   batch_size=cfg.recipe.eval_batch_size))
    return result
