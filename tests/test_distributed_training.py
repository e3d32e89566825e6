"""Data-parallel training of the library's stage on 2 CPU processes (torchrun, gloo): plain DDP (also under
`accelerate launch`), DeepSpeed ZeRO-2 and ZeRO-3 end with the same weights on both ranks and the same losses
and weights as one process with the same global batch (`training.global_batch_size`), and the run's
`mm_projector.bin` is the full projector."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import tiny_bases

pytestmark = pytest.mark.slow
pytest.importorskip("deepspeed")

DRIVER = Path(__file__).with_name("distributed_driver.py")
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (losses, {rank: trained parameters}, run dir)} for one process and three 2-process runs."""
    bases = tiny_bases(tmp_path_factory)
    root = tmp_path_factory.mktemp("distributed")
    common = [
        "model=tiny", "training=stage2_lora", f"data.train_path={bases.data.train}",
        f"data.image_folder={bases.data.root}", f"model.llm.path={bases.llm}", f"model.vision_tower.path={bases.clip}",
        f"training.max_steps={STEPS}", "training.save_steps=1", "training.global_batch_size=8",
        "training.per_device_train_batch_size=8", "training.logging_steps=1", "training.report_to=[]",
        "training.learning_rate=1e-3", "training.lora_r=8", "training.lora_alpha=16", "training.lora_dropout=0.0",
        "training.warmup_ratio=0.0", "training.mm_projector_lr=null",
    ]
    variants = {"one": (1, []), "ddp": (2, []), "accelerate": (2, []), "zero2": (2, ["training.deepspeed=zero2"]),
                "zero3": (2, ["training.deepspeed=zero3"]),
                # ZeRO-3 again, resumed from the ZeRO-3 run's checkpoint of step STEPS - 1
                "zero3_resumed": (2, ["training.deepspeed=zero3", "training.resume_from_checkpoint="
                                      f"{root / 'zero3' / 'run' / f'checkpoint-{STEPS - 1}'}"])}
    results = {}
    for name, (procs, extra) in variants.items():
        out = root / name
        bin_dir = Path(sys.executable).parent
        if name == "accelerate":  # `accelerate launch`: its multi-process launcher; on a CPU vir picks gloo
            launcher = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", f"--num_processes={procs}",
                        "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no"]
        else:
            launcher = [str(bin_dir / "torchrun"), "--standalone", f"--nproc_per_node={procs}"]
        command = [*launcher, str(DRIVER), str(out), *common, f"training.output_dir={out / 'run'}", *extra]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, f"{name}: {_failure(proc.stderr)}"
        history = json.loads((out / "run" / "trainer_state.json").read_text())["log_history"]
        losses = [row["loss"] for row in history if "loss" in row]
        weights = {rank: torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(procs)}
        results[name] = (losses, weights, out / "run")
    return results


def _failure(stderr: str) -> str:
    """What a failed launch printed: every line a worker other than rank 0 wrote (its own error, which the launcher's
    summary leaves out and rank 0's "connection closed" hides), then the end of the output."""
    others = [line for line in stderr.splitlines() if re.match(r"\[(rank|default)[1-9]\d*\]", line)]
    return "\n".join(others[-60:]) + "\n...\n" + stderr[-3000:]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["ddp", "accelerate", "zero2", "zero3"])
def test_two_processes_train_what_one_process_does(runs, name):
    losses, weights, _ = runs[name]
    one_losses, one_weights, _ = runs["one"]
    assert len(losses) == STEPS
    assert losses == pytest.approx(one_losses, rel=1e-5)
    if name != "zero3":  # ZeRO-3 partitions parameters: each rank holds only its shard
        assert _max_difference(weights[0], weights[1]) == 0.0
        assert _max_difference(weights[0], one_weights[0]) < 1e-6


def test_a_zero3_run_resumes_from_its_checkpoint_to_the_same_end(runs):
    """Resumed at step STEPS - 1, the ZeRO-3 run trains the last step to the uninterrupted run's loss and weights."""
    from safetensors.torch import load_file

    losses, _, resumed = runs["zero3_resumed"]
    full_losses, _, full = runs["zero3"]
    # The resumed state carries the first steps' records; the last step is the one trained after resuming.
    assert losses == pytest.approx(full_losses, rel=1e-5)
    for name in ("mm_projector.bin", "adapter_model.safetensors"):
        load = (lambda p: torch.load(p, weights_only=True)) if name.endswith(".bin") else load_file
        a, b = load(resumed / name), load(full / name)
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, name


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3"])
def test_the_saved_projector_is_whole_and_matches_one_process(runs, name):
    run = runs[name][2]
    one = torch.load(runs["one"][2] / "mm_projector.bin", weights_only=True)
    for directory in (run, run / f"checkpoint-{STEPS}"):
        saved = torch.load(directory / "mm_projector.bin", weights_only=True)
        assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in one.items()}
        assert max(float((saved[k] - one[k]).abs().max()) for k in one) < 1e-6


def test_zero3_trains_a_tied_embedding_family_as_one_process_does(tmp_path_factory):
    """Qwen2 with tied embeddings and a SigLIP tower under ZeRO-3 on 2 processes: the losses of one process."""
    from family_models import family_llm_dir, tower_dir
    from training_fixtures import synthetic_data
    from vir.training.run import run_training
    from vir.utils.config import compose_config

    data = synthetic_data(tmp_path_factory)
    root = tmp_path_factory.mktemp("zero3_qwen2")
    common = [
        "model=tiny", "training=stage2_lora", f"data.train_path={data.train}", f"data.image_folder={data.root}",
        f"model.llm.path={family_llm_dir(tmp_path_factory, 'qwen2')}", "data.template=chatml",
        f"model.vision_tower.path={tower_dir(tmp_path_factory, 'siglip')}", "model.model_max_length=256",
        "training.max_steps=2", "training.global_batch_size=8", "training.per_device_train_batch_size=8",
        "training.logging_steps=1", "training.report_to=[]", "training.learning_rate=1e-3", "training.lora_r=8",
        "training.lora_alpha=16", "training.lora_dropout=0.0", "training.warmup_ratio=0.0",
        "training.mm_projector_lr=null", "training.save_steps=500",
    ]
    one = run_training(compose_config([*common, f"training.output_dir={root / 'one'}"]))
    assert one.global_step == 2
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(DRIVER),
               str(root / "zero3"), *common, f"training.output_dir={root / 'zero3' / 'run'}",
               "training.deepspeed=zero3"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, _failure(proc.stderr)

    def losses(run_dir):
        history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        return [row["loss"] for row in history if "loss" in row]

    assert losses(root / "zero3" / "run") == pytest.approx(losses(root / "one"), rel=1e-5)
