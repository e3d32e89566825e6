"""Each of LLaVA-1.5's recipes (conf/experiment/llava15_*, cloud_scale) trains as shipped, at the tiny bases' size:
two optimizer steps of the recipe's own mode, template, precision, checkpointing, grouping and schedule, with only
the paths, the global batch and DeepSpeed (tested apart, tests/test_distributed_training.py) set for one CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from training_fixtures import tiny_bases, train

from vir.utils.config import compose_config

RECIPES = {  # experiment: (what trains, the file the recipe reads)
    "llava15_stage1": ("projector", "stage1"),
    "llava15_stage2_full": ("llm", "train"),
    "llava15_stage2_lora": ("lora", "train"),
    "cloud_scale": ("llm", "train"),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


@pytest.mark.parametrize("experiment", list(RECIPES))
def test_each_llava_recipe_trains_as_shipped_at_tiny_size(bases, tmp_path, experiment):
    trains, records = RECIPES[experiment]
    data = bases.data
    cfg = compose_config([
        f"experiment={experiment}", f"model.llm.path={bases.llm}", f"model.vision_tower.path={bases.clip}",
        f"data.train_path={getattr(data, records)}", f"data.image_folder={data.root}",
        f"training.output_dir={tmp_path / 'run'}", "training.deepspeed=null", "training.global_batch_size=8",
        "training.per_device_train_batch_size=4", "training.max_steps=2", "training.save_steps=2",
        "training.logging_steps=1", "training.report_to=[]", "model.model_max_length=512"])
    run = train(cfg)
    args = run.trainer.args
    # The recipe's own settings reached the Trainer; the global batch of 8 became 4 x 2 accumulation steps.
    assert args.gradient_accumulation_steps == 2 and args.per_device_train_batch_size == 4
    assert args.bf16 and args.gradient_checkpointing and args.lr_scheduler_type == "cosine"
    assert args.learning_rate == cfg.training.learning_rate and args.warmup_steps == pytest.approx(0.03)  # a ratio
    losses = [row["loss"] for row in run.outcome.log_history if "loss" in row]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), losses
    out = run.output_dir
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    assert projector and all(torch.isfinite(t).all() for t in projector.values())
    assert any(not torch.equal(projector[k].float(), run.initial_projector[k].float().cpu()) for k in projector)
    if trains == "lora":
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 128
    if trains == "llm":
        assert (out / "model.safetensors").is_file() or any(out.glob("model*.safetensors"))
