"""Training modes: after one backward, exactly the parameters each mode should train have gradients."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from training_fixtures import mixed_batch, run_config, tiny_bases

from vir.models.builder import build_all
from vir.training.modes import apply_training_mode, lora_target_modules


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _backward(bases, tmp_path, mode, *overrides):
    """Build from the tiny bases, apply `mode`, run one forward/backward on a mixed batch."""
    cfg = run_config(bases, tmp_path, mode, *overrides)
    model, tokenizer, processor = build_all(cfg)
    model = apply_training_mode(model, cfg.training, vision_tower_freeze=cfg.model.vision_tower.freeze)
    model.train()
    batch = mixed_batch(bases, tokenizer, processor, model.config.num_image_tokens)
    loss = model(**batch).loss
    loss.backward()
    return model, {name: param for name, param in model.named_parameters()}


def _with_grad(params: dict) -> set[str]:
    return {name for name, param in params.items() if param.grad is not None}


def test_stage1_trains_only_the_projector(bases, tmp_path):
    _, params = _backward(bases, tmp_path, "stage1")
    with_grad = _with_grad(params)
    assert with_grad == {n for n in params if "mm_projector" in n}
    assert {n.rsplit("mm_projector.", 1)[1] for n in with_grad} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert all(params[n].grad.abs().sum() > 0 for n in with_grad)
    assert {n for n, p in params.items() if p.requires_grad} == with_grad


def test_stage2_lora_trains_lora_weights_and_the_projector_only(bases, tmp_path):
    model, params = _backward(bases, tmp_path, "stage2_lora")
    with_grad = _with_grad(params)
    lora = {n for n in with_grad if "lora_" in n}
    projector = {n for n in with_grad if "mm_projector" in n}
    assert lora and len(projector) == 4 and with_grad == lora | projector
    # LoRA sits on the LLM's layers only, and every LLM linear layer has it.
    assert not any("vision_tower" in n or "mm_projector" in n or "lm_head" in n for n in lora)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[1] for n in lora}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, param in params.items():
        if "vision_tower" in name or "lm_head" in name or "embed_tokens" in name or "base_layer" in name:
            assert param.grad is None, name
    # lora_B starts at zero, so only the B matrices get a gradient on the very first step.
    assert any(params[n].grad.abs().sum() > 0 for n in lora if "lora_B" in n)


def test_stage2_full_trains_the_llm_and_projector_but_not_the_vision_tower(bases, tmp_path):
    _, params = _backward(bases, tmp_path, "stage2_full")
    with_grad = _with_grad(params)
    assert with_grad == {n for n in params if "vision_tower" not in n}
    assert "lm_head.weight" in with_grad and "model.embed_tokens.weight" in with_grad


def test_unfrozen_vision_tower_trains_when_asked(bases, tmp_path):
    _, params = _backward(bases, tmp_path, "stage2_full", "model.vision_tower.freeze=false")
    tower = {n for n in params if "vision_tower" in n}
    # select_layer=-2 reads the output of layer 0 of 2: the last layer and post_layernorm never reach the loss.
    unused = {n for n in tower if "encoder.layers.1." in n or "post_layernorm" in n}
    assert unused and {n for n in tower if params[n].grad is not None} == tower - unused


def test_lora_target_modules_exclude_projector_vision_tower_and_lm_head(bases, tmp_path):
    cfg = run_config(bases, tmp_path, "stage2_lora")
    model, _, _ = build_all(cfg)
    targets = lora_target_modules(model)
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # The CLIP tower's own q_proj/k_proj/v_proj share those names: they must still get no LoRA.
    peft_model = apply_training_mode(model, cfg.training)
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped and not any("vision_tower" in n or "mm_projector" in n or "lm_head" in n for n in wrapped)
    assert len(wrapped) == 7 * cfg.model.llm.num_hidden_layers


def test_unknown_mode_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="training.mode='stage3'"):
        apply_training_mode(torch.nn.Linear(2, 2), OmegaConf.create({"mode": "stage3"}))


def test_stage2_lora_refuses_an_unfrozen_vision_tower(bases, tmp_path):
    cfg = run_config(bases, tmp_path, "stage2_lora", "model.vision_tower.freeze=false")
    model, _, _ = build_all(cfg)
    with pytest.raises(ValueError, match="model.vision_tower.freeze=false"):
        apply_training_mode(model, cfg.training, vision_tower_freeze=False)


@pytest.mark.parametrize("mode", ["stage1", "stage2_lora"])
def test_a_bf16_model_trains_its_projector_in_fp32(bases, tmp_path, mode):
    """model.llm.dtype=bfloat16 (the 8B recipe): the trained projector holds fp32 weights, so an AdamW step of
    ~1e-5 is not rounded away; the LLM stays bf16 and the step runs end to end."""
    model, params = _backward(bases, tmp_path, mode, "model.llm.dtype=bfloat16")
    projector = {n: p for n, p in params.items() if "mm_projector" in n}
    assert projector and all(p.dtype == torch.float32 and p.grad is not None for p in projector.values())
    assert any(p.dtype == torch.bfloat16 for n, p in params.items() if "layers.0.self_attn.q_proj.base_layer" in n
               or n.endswith("layers.0.self_attn.q_proj.weight"))
    weight = next(p for n, p in projector.items() if n.endswith("0.weight"))
    before = weight.detach().clone()
    torch.optim.AdamW([weight], lr=2e-5).step()
    assert (weight.detach() != before).float().mean() > 0.9  # nearly every weight moved
