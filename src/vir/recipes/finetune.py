"""`recipe.name=single`: one training stage exactly as configured, on the user's own data and bases."""

from __future__ import annotations

from pathlib import Path
from typing import List

from omegaconf import DictConfig

from vir.inference.evaluate import EvalItem, evaluate_run, load_eval_items
from vir.training.distributed import run_state


def visualizer_samples(cfg: DictConfig, num_samples: int) -> List[EvalItem]:
    """The first `num_samples` eval records, for the sample visualiser (none without `data.eval_path`)."""
    if not num_samples or not cfg.data.eval_path:
        return []
    return load_eval_items(cfg.data.eval_path, cfg.data.image_folder)[:num_samples]


def run(cfg: DictConfig) -> dict:
    """Train as `training.*` says; when `data.test_path` is set, evaluate the run on it afterwards."""
    from vir.training.run import run_training

    samples = visualizer_samples(cfg, cfg.recipe.num_visualizer_samples)
    outcome = run_training(cfg, visualizer_samples=samples)
    if not run_state().is_main_process:  # under torchrun the main process evaluates and reports
        return {}
    result = {"output_dir": str(outcome.output_dir), "steps": outcome.global_step, "train_loss": outcome.train_loss}
    if cfg.data.test_path:
        result.update(evaluate_run(Path(cfg.training.output_dir), split="test",
                                   max_new_tokens=cfg.recipe.eval_max_new_tokens,
                                   batch_size=cfg.recipe.eval_batch_size))
    return result
