"""The embedded default's stage wiring (pure) and the recipe registry of `vir-train`."""

from __future__ import annotations

from pathlib import Path

from vir.cli.train import recipes
from vir.demo.recipe import stage_configs
from vir.utils.config import check_config, compose_config


def test_stage_configs_chain_bases_stage1_and_stage2(tmp_path):
    cfg = compose_config(["experiment=local_debug", f"training.output_dir={tmp_path}/run"])
    stages = stage_configs(cfg, tmp_path / "data", tmp_path / "bases/llm", tmp_path / "bases/clip")
    s1, s2 = stages["stage1"], stages["stage2"]
    for stage in (s1, s2):
        check_config(stage)  # still a valid config (what vir_config.yaml will hold)
        assert stage.model.llm.path == str(tmp_path / "bases/llm")
        assert stage.model.vision_tower.path == str(tmp_path / "bases/clip")
        assert stage.model.tokenizer_path is None
    assert s1.training.mode == "stage1" and s1.data.template == "plain"
    assert s1.data.train_path.endswith("stage1.json") and s1.data.eval_path is None
    assert Path(s1.training.output_dir) == tmp_path / "run" / "stage1"
    assert s2.training.mode == "stage2_lora" and s2.data.template == "llama3"
    assert s2.model.pretrained_projector == str(tmp_path / "run" / "stage1" / "mm_projector.bin")
    assert Path(s2.training.output_dir) == tmp_path / "run"
    assert s2.data.test_path.endswith("test.json")
    assert cfg.model.llm.path is None  # the input config is not mutated


def test_every_recipe_module_has_run():
    import importlib

    found = recipes()
    assert {"single", "synthetic_llava"} <= set(found)
    for module in found.values():
        assert callable(importlib.import_module(module).run)
