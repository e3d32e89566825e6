"""`vir-plan`: the memory plan's weight, gradient and optimizer bytes equal what the real model holds on the CPU
(the tiny bases, every mode, QLoRA too); activations and logits follow their formulas; the command prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from training_fixtures import run_config, tiny_bases

from vir.models.builder import build_all
from vir.planning.memory import GB, plan_memory
from vir.training.modes import apply_training_mode


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _measured(cfg) -> dict:
    """Bytes the real model holds after one AdamW step: weights (parameters), gradients, optimizer states."""
    model, _, _ = build_all(cfg)
    model = apply_training_mode(model, cfg.training, vision_tower_freeze=cfg.model.vision_tower.freeze)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for param in trainable:
        param.grad = torch.ones_like(param)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    optimizer.step()
    states = [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t) and t.dim()]
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors) / GB  # noqa: E731
    return {"weights": size(model.parameters()), "grads": size(p.grad for p in trainable), "optimizer": size(states),
            "trainable": sum(p.numel() for p in trainable)}


@pytest.mark.parametrize("mode, extra", [("stage1", ()), ("stage2_lora", ()), ("stage2_full", ()),
                                         ("stage2_full", ("model.vision_tower.freeze=false",)),
                                         ("stage2_lora", ("model.llm.dtype=bfloat16",)),
                                         ("stage2_full", ("model.llm.dtype=bfloat16",))])
def test_planned_weights_grads_and_optimizer_are_the_real_models(bases, tmp_path, mode, extra):
    cfg = run_config(bases, tmp_path, mode, *extra)
    plan, real = plan_memory(cfg), _measured(cfg)
    assert plan.trainable_parameters == real["trainable"]
    for part in ("weights", "grads", "optimizer"):
        assert getattr(plan, f"{part}_gb") == pytest.approx(real[part], rel=1e-3, abs=1e-6), part


def test_planned_qlora_weights_are_the_real_4bit_models(bases, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = run_config(bases, tmp_path, "stage2_lora", "model.llm.quantization=nf4", "model.llm.dtype=bfloat16")
    plan, real = plan_memory(cfg), _measured(cfg)
    assert plan.trainable_parameters == real["trainable"]
    assert plan.grads_gb == pytest.approx(real["grads"], rel=1e-3) and plan.optimizer_gb == pytest.approx(
        real["optimizer"], rel=1e-3)
    # 4-bit weights are stored as bytes of two; the plan adds the quantization constants bitsandbytes keeps apart.
    assert real["weights"] < plan.weights_gb < real["weights"] * 1.05


def test_checkpointing_zero_and_micro_batch_move_the_right_parts(bases, tmp_path):
    base = plan_memory(run_config(bases, tmp_path, "stage2_full", "training.per_device_train_batch_size=4"))
    checkpointed = plan_memory(run_config(bases, tmp_path, "stage2_full", "training.per_device_train_batch_size=4",
                                          "training.gradient_checkpointing=true"))
    assert checkpointed.activations_gb < base.activations_gb and checkpointed.weights_gb == base.weights_gb
    doubled = plan_memory(run_config(bases, tmp_path, "stage2_full", "training.per_device_train_batch_size=8"))
    assert doubled.activations_gb == pytest.approx(2 * base.activations_gb)
    # Logits: one chunk of rows with the chunked loss (4 x 512 tokens > 1024 already), every row without it.
    assert doubled.logits_gb == pytest.approx(base.logits_gb)
    full = [plan_memory(run_config(bases, tmp_path, "stage2_full", f"training.per_device_train_batch_size={n}",
                                   "training.loss_chunk_size=0")) for n in (4, 8)]
    assert full[1].logits_gb == pytest.approx(2 * full[0].logits_gb) == pytest.approx(4 * base.logits_gb)
    zero3 = plan_memory(run_config(bases, tmp_path, "stage2_full", "training.per_device_train_batch_size=4",
                                   "training.deepspeed=zero3"), world_size=4)
    assert zero3.zero_stage == 3 and zero3.weights_gb == pytest.approx(base.weights_gb / 4)
    assert zero3.grads_gb == pytest.approx(base.grads_gb / 4)


def test_vir_plan_prints_the_8b_qlora_plan_as_json_without_weights():
    proc = subprocess.run([sys.executable, "-m", "vir.cli.plan", "experiment=llava15_qlora", "model.llm.path=null",
                           "model.vision_tower.path=null", "training.per_device_train_batch_size=1",
                           "training.lora_r=64", "plan.output=json", "plan.gpu_gb=24"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {"peak_gb", "weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "logits_gb", "fits"} <= set(plan)
    assert plan["fits"] and 8 < plan["peak_gb"] < 24
    assert plan["peak_gb"] == pytest.approx(sum(plan[k] for k in ("weights_gb", "grads_gb", "optimizer_gb",
                                                                  "activations_gb", "logits_gb")), abs=0.01)
