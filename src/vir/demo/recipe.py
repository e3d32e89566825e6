"""The embedded default (`recipe.name=synthetic_llava`): the real LLaVA recipe, end to end, on a laptop CPU.

    synthetic data ─┬─> tiny CLIP + tiny Llama trained from scratch, saved as local HF dirs (`bases`)
                    ├─> stage 1: projector alignment on captions (plain template; LLM + tower frozen)
                    ├─> stage 2: LoRA instruction tuning + projector (llama3 template), from stage 1's projector
                    └─> held-out test: exact match per question type, beside a blind baseline (images blanked)

Every stage consumes the previous one's artifacts through the same config keys a real run uses
(`model.llm.path`, `model.vision_tower.path`, `model.pretrained_projector`, `data.*`). Under `torchrun`
(`make train` runs two processes) rank 0 writes the data set and the tower on every core while the others
wait, the LLM base and both stages train data-parallel, and rank 0 alone evaluates; the other processes
return `{}`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from vir.demo.synthetic import generate
from vir.inference.evaluate import evaluate_run
from vir.training.distributed import borrowed_cores, main_process_first, run_state
from vir.training.finetune import visualizer_samples

logger = logging.getLogger(__name__)


def stage_configs(cfg: DictConfig, data_root: Path, llm_dir: Path, clip_dir: Path) -> Dict[str, DictConfig]:
    """The composed configs of stage 1 and stage 2 (pure: derived from `cfg` and the produced paths)."""
    run_dir = Path(cfg.training.output_dir)
    common = cfg.copy()
    OmegaConf.set_struct(common, True)
    common.model.llm.path = str(llm_dir)
    common.model.vision_tower.path = str(clip_dir)
    common.model.tokenizer_path = None  # the base LLM directory carries its tokenizer
    common.data.image_folder = str(data_root)

    stage1 = common.copy()
    stage1.training = cfg.demo.stage1.copy()
    stage1.training.output_dir = str(run_dir / Path(cfg.demo.stage1.output_dir).name)
    stage1.data.template = "plain"
    stage1.data.train_path = str(data_root / "stage1.json")
    stage1.data.eval_path = None
    stage1.model.pretrained_projector = None
    if cfg.training.resume_from_checkpoint == "auto":  # an explicit checkpoint is stage 2's, not stage 1's
        stage1.training.resume_from_checkpoint = "auto"

    stage2 = common.copy()
    stage2.data.train_path = str(data_root / "train.json")
    stage2.data.eval_path = str(data_root / "eval.json")
    stage2.data.test_path = str(data_root / "test.json")
    stage2.model.pretrained_projector = str(Path(stage1.training.output_dir) / "mm_projector.bin")
    return {"stage1": stage1, "stage2": stage2}


def run(cfg: DictConfig) -> Dict[str, Any]:
    """Run every stage; returns the test metrics (also written to `<run dir>/metrics.json`)."""
    from vir.demo.bases import build_bases
    from vir.training.run import run_training

    run_dir = Path(cfg.training.output_dir)
    with main_process_first():  # the others wait, then find it done
        paths = generate(run_dir / "data", cfg.demo.synthetic)
    llm_dir, clip_dir = build_bases(cfg.demo.bases.output_dir, cfg, tokenizer_dir=paths.tokenizer)
    stages = stage_configs(cfg, paths.root, llm_dir, clip_dir)

    logger.info("stage 1: projector alignment -> %s", stages["stage1"].training.output_dir)
    stage1 = run_training(stages["stage1"])
    logger.info("stage 2: %s -> %s", cfg.training.mode, run_dir)
    samples = visualizer_samples(stages["stage2"], cfg.recipe.num_visualizer_samples)
    stage2 = run_training(stages["stage2"], visualizer_samples=samples)
    if not run_state().is_main_process:
        return {}

    losses = {
        "stage1": {"steps": stage1.global_step, "train_loss": stage1.train_loss},
        "stage2": {"steps": stage2.global_step, "train_loss": stage2.train_loss},
    }
    with borrowed_cores():  # the other processes have returned
        return evaluate_run(run_dir, split=cfg.demo.eval_split, max_new_tokens=cfg.recipe.eval_max_new_tokens,
                            batch_size=cfg.recipe.eval_batch_size,
                            training={"stages": losses, "data_stats": stage2.data_stats})
