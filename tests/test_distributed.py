"""`torchrun` with two gloo processes on CPU: the embedded default's recipe runs data-parallel end to end.

Rank 0 writes the data set and the tower while the other waits, the LLM base and both stages train on two
processes, rank 0 alone evaluates and reports, and the data-pipeline counters are summed over both processes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vir.training.distributed import borrowed_cores, sum_over_processes

TINY = [
    "experiment=local_debug_scratch",
    "demo.synthetic.num_stage1=32", "demo.synthetic.num_train=48", "demo.synthetic.num_eval=8",
    "demo.synthetic.num_test=8", "demo.synthetic.vocab_size=400", "demo.synthetic.image_size=32",
    "model.vision_tower.image_size=32", "model.vision_tower.patch_size=8", "model.vision_tower.hidden_size=32",
    "model.vision_tower.intermediate_size=64", "model.vision_tower.num_hidden_layers=1",
    "model.vision_tower.num_attention_heads=2",
    "model.llm.hidden_size=32", "model.llm.intermediate_size=64", "model.llm.num_hidden_layers=1",
    "model.llm.num_attention_heads=2", "model.llm.num_key_value_heads=2",
    "demo.bases.vision.max_steps=3", "demo.bases.vision.bank_size=64", "demo.bases.vision.eval_size=16", "demo.bases.vision.batch_size=16",
    "demo.bases.llm.max_steps=3", "demo.bases.llm.num_scene_qa=16", "demo.bases.llm.eval_size=4", "demo.bases.llm.batch_size=8",
    "demo.stage1.max_steps=3", "demo.stage1.per_device_train_batch_size=4", "demo.stage1.save_steps=3",
    "demo.stage1.report_to=[]", "recipe.num_visualizer_samples=2",
    "training.max_steps=4", "training.per_device_train_batch_size=4", "training.per_device_eval_batch_size=4",
    "training.save_steps=2", "training.eval_steps=4", "training.logging_steps=1", "training.report_to=[]",
    "training.length_grouping=2",
]


def test_sum_over_processes_is_the_identity_in_one_process():
    assert sum_over_processes({"a": 1, "b": 0}) == {"a": 1, "b": 0}


def test_borrowed_cores_multiplies_threads_by_the_local_processes_and_restores_them(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with borrowed_cores():
        assert torch.get_num_threads() == 2 * threads
    assert torch.get_num_threads() == threads
    with borrowed_cores(borrow=False):
        assert torch.get_num_threads() == threads
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with borrowed_cores():
        assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_torchrun_two_processes_run_the_synthetic_recipe_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vir.cli.train", *TINY, f"training.output_dir={run_dir}"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("test accuracy:") == 1, done.stdout[-2000:]  # only the main process reports

    for name in ("mm_projector.bin", "adapter_model.safetensors", "metrics.json", "data_stats.json", "curves.png",
                 "samples/step-4.png", "checkpoint-4/mm_projector.bin", "stage1/mm_projector.bin",
                 "bases/llm/model.safetensors", "bases/clip/model.safetensors"):
        assert (run_dir / name).is_file(), name
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # The LLM base trained data-parallel too; the tower (short) on rank 0 alone.
    assert json.loads((run_dir / "bases/llm/pretrain_metrics.json").read_text())["processes"] == 2
    # Two processes x 4 records x 4 steps were loaded, and the saved counters say so (not one rank's half).
    stats = json.loads((run_dir / "data_stats.json").read_text())
    assert stats["images_ok"] + stats["images_corrupt"] + stats["images_missing"] >= 2 * 4 * 4 - 8
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["per_type"]) and 0.0 <= metrics["accuracy"] <= 1.0

    # Interrupted after stage 2's checkpoint-2 (what a kill leaves: no completion record, no later checkpoint):
    # the same command skips the data, the bases and stage 1, and resumes stage 2 to the same losses.
    losses = {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row}
    shutil.rmtree(run_dir / "checkpoint-4")
    for name in ("training_complete.json", "trainer_state.json", "adapter_model.safetensors"):
        (run_dir / name).unlink()
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"{run_dir / 'stage1'} already finished this run" in again.stderr
    assert f"resuming from {run_dir / 'checkpoint-2'}" in again.stderr
    state = json.loads((run_dir / "trainer_state.json").read_text())
    assert {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row} == losses
