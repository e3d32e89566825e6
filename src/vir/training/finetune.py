"""`recipe.name=single`: one training stage exactly as configured, on the user's own data and bases."""

from __future__ import annotations

from pathlib import Path
from typing import List

from omegaconf import DictConfig, OmegaConf

from vir.inference.evaluate import EvalItem, evaluate_run, load_eval_items
from vir.training.distributed import run_state
from vir.utils.config import ConfigError

# What a user's run must name; the demo (experiment=local_debug) fills them itself.
_REQUIRED = ("data.train_path", "model.llm.path", "model.vision_tower.path")


def check_inputs(cfg: DictConfig) -> None:
    """Raise `ConfigError` in one line when the data or the model directories are not set (`???` or null)."""
    if OmegaConf.select(cfg, "data.train_path") is None:
        raise ConfigError(
            "nothing to train: set data.train_path=YOUR_DATA.json (LLaVA format) and data.image_folder=..., with "
            "model.llm.path=... and model.vision_tower.path=... (local Llama-3 / CLIP directories); "
            "or run the embedded demo with experiment=local_debug")
    if OmegaConf.select(cfg, "model.init_from_hf") is not None:
        return  # the Llava directory provides the LLM, the tower and the projector
    unset = [key for key in _REQUIRED[1:] if _is_missing(cfg, key)]
    if unset:
        raise ConfigError(f"{' and '.join(unset)} must name a local model directory (null builds a random-init "
                          "model from the size fields, as model=tiny does)")


def _is_missing(cfg: DictConfig, key: str) -> bool:
    """Whether dotted `key` is `???` (mandatory and not given) in `cfg`."""
    parent, _, leaf = key.rpartition(".")
    return OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf)


def visualizer_samples(cfg: DictConfig, num_samples: int) -> List[EvalItem]:
    """The first `num_samples` eval records, for the sample visualiser (none without `data.eval_path`)."""
    if not num_samples or not cfg.data.eval_path:
        return []
    return load_eval_items(cfg.data.eval_path, cfg.data.image_folder, cfg.model.image_token)[:num_samples]


def run(cfg: DictConfig) -> dict:
    """Train as `training.*` says; when `data.test_path` is set, evaluate the run on it afterwards."""
    from vir.training.run import run_training

    check_inputs(cfg)
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
