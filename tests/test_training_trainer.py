"""LlavaTrainer: LLaVA artifacts in every save, run-dir reload equal to the trained model, param groups."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from training_fixtures import IMAGE_SIZE, PATCH_SIZE, RUNS, logits_of, mixed_batch, run_config, tiny_bases, train

from vir.models import LlavaLlamaForCausalLM
from vir.models.builder import build_image_processor, build_tokenizer
from vir.models.model_config import build_model_config
from vir.models.checkpoint import load_run
from vir.models.projector import load_projector_state_dict, projector_state_dict
from vir.training.sampler import ModalityGroupedSampler
from vir.training.trainer import build_param_groups

LLAVA_PROJECTOR_KEYS = {"model.mm_projector.0.weight", "model.mm_projector.0.bias",
                        "model.mm_projector.2.weight", "model.mm_projector.2.bias"}
COMMON_FILES = ("mm_projector.bin", "config.json", "tokenizer.json", "tokenizer_config.json",
                "preprocessor_config.json", "vir_config.yaml")
MODE_FILES = {
    "stage1": ((), ("model.safetensors", "adapter_model.safetensors")),  # (present, absent)
    "stage2_lora": (("adapter_model.safetensors", "adapter_config.json"), ("model.safetensors",)),
    "stage2_full": (("model.safetensors",), ("adapter_model.safetensors",)),
}
CHECKPOINT_STEPS = {"stage1": [2, 4, 5], "stage2_lora": [1, 2], "stage2_full": [1, 2]}


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


@pytest.fixture(scope="session", params=sorted(RUNS))
def trained(request, tmp_path_factory):
    return RUNS[request.param](tmp_path_factory)


@pytest.fixture(scope="session")
def batch(bases, tmp_path_factory):
    cfg = run_config(bases, tmp_path_factory.mktemp("unused"), "stage1")
    tokenizer, processor = build_tokenizer(cfg.model), build_image_processor(cfg.model)
    return mixed_batch(bases, tokenizer, processor, num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2)


def _checkpoints(run):
    return sorted(run.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _projector_of_snapshot(snapshot: dict) -> dict:
    return {"model.mm_projector." + k.rpartition("mm_projector.")[2]: v for k, v in snapshot.items()
            if "mm_projector." in k}


def test_every_save_holds_the_llava_artifacts(trained):
    mode = trained.cfg.training.mode
    checkpoints = _checkpoints(trained)
    assert [int(c.name.split("-")[1]) for c in checkpoints] == CHECKPOINT_STEPS[mode]
    present, absent = MODE_FILES[mode]
    for directory in [trained.output_dir, *checkpoints]:
        for name in (*COMMON_FILES, *present):
            assert (directory / name).is_file(), f"{directory.name}/{name} missing ({mode})"
        for name in absent:
            assert not (directory / name).exists(), f"{directory.name}/{name} should not be written ({mode})"
        config = json.loads((directory / "config.json").read_text())
        assert config["model_type"] == "llava_llama" and config["mm_projector_type"] == "mlp2x_gelu"
    for directory in checkpoints:
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= {p.name for p in directory.iterdir()}


def test_mm_projector_bin_has_exactly_llavas_keys_and_the_saved_values(trained):
    for checkpoint in _checkpoints(trained):
        state = torch.load(checkpoint / "mm_projector.bin", map_location="cpu", weights_only=True)
        assert set(state) == LLAVA_PROJECTOR_KEYS
        expected = _projector_of_snapshot(trained.snapshots[int(checkpoint.name.split("-")[1])])
        assert all(torch.equal(state[k], expected[k]) for k in LLAVA_PROJECTOR_KEYS), checkpoint.name
    final = torch.load(trained.output_dir / "mm_projector.bin", map_location="cpu", weights_only=True)
    live = projector_state_dict(trained.model)
    assert set(final) == LLAVA_PROJECTOR_KEYS and all(torch.equal(final[k], live[k]) for k in final)
    first = torch.load(_checkpoints(trained)[0] / "mm_projector.bin", weights_only=True)
    assert not torch.equal(first["model.mm_projector.0.weight"], final["model.mm_projector.0.weight"])


def test_mm_projector_bin_round_trips_into_a_fresh_model_as_llava_loads_it(trained):
    tokenizer = build_tokenizer(trained.cfg.model)
    saved = torch.load(trained.output_dir / "mm_projector.bin", map_location="cpu", weights_only=True)

    # LLaVA's own loader (llava_arch.initialize_vision_modules): strip everything up to "mm_projector.".
    llava_style = LlavaLlamaForCausalLM(build_model_config(trained.cfg.model, tokenizer))
    assert LLAVA_PROJECTOR_KEYS <= set(llava_style.state_dict())  # same names as the full model's keys
    llava_style.get_model().mm_projector.load_state_dict(
        {k.split("mm_projector.")[1]: v for k, v in saved.items() if "mm_projector" in k})
    ours = LlavaLlamaForCausalLM(build_model_config(trained.cfg.model, tokenizer))
    load_projector_state_dict(ours, trained.output_dir / "mm_projector.bin")
    for model in (llava_style, ours):
        reloaded = projector_state_dict(model)
        assert all(torch.equal(reloaded[k], saved[k]) for k in LLAVA_PROJECTOR_KEYS)


def test_run_dir_reload_gives_the_trained_models_logits(trained, batch):
    reference = logits_of(trained.model, batch)
    model, tokenizer, processor, run_cfg = load_run(trained.output_dir)
    assert not model.training and run_cfg.training.mode == trained.cfg.training.mode
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert processor.crop_size == {"height": 32, "width": 32}
    kind = {"stage2_lora": "PeftModelForCausalLM", "stage1": "LlavaLlamaForCausalLM",
            "stage2_full": "LlavaLlamaForCausalLM"}[trained.cfg.training.mode]
    assert type(model).__name__ == kind
    torch.testing.assert_close(logits_of(model, batch), reference, rtol=0, atol=1e-6)
    default = "cuda" if torch.cuda.is_available() else "cpu"  # the accelerator when there is one
    assert {p.device.type for p in model.parameters()} == {default}
    placed = load_run(trained.output_dir, device="meta")[0]
    assert {p.device.type for p in placed.parameters()} == {"meta"}


def test_checkpoint_reload_gives_the_models_logits_at_that_step(trained, batch):
    final, first = _checkpoints(trained)[-1], _checkpoints(trained)[0]
    torch.testing.assert_close(logits_of(load_run(final)[0], batch), logits_of(trained.model, batch),
                               rtol=0, atol=1e-6)
    at_first = copy.deepcopy(trained.model)
    at_first.load_state_dict(trained.snapshots[int(first.name.split("-")[1])])
    expected = logits_of(at_first, batch)
    assert not torch.allclose(expected, logits_of(trained.model, batch))  # the steps in between changed it
    torch.testing.assert_close(logits_of(load_run(first)[0], batch), expected, rtol=0, atol=1e-6)


def test_merged_lora_reload_matches_the_adapter(tmp_path_factory, batch):
    run = RUNS["stage2_lora"](tmp_path_factory)
    merged = load_run(run.output_dir, merge_adapter=True)[0]
    assert type(merged).__name__ == "LlavaLlamaForCausalLM"
    torch.testing.assert_close(logits_of(merged, batch), logits_of(run.model, batch), rtol=0, atol=1e-5)


def test_build_param_groups_splits_lr_and_decay():
    params = {name: nn.Parameter(torch.zeros(2)) for name in (
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight", "model.norm.weight",
        "model.mm_projector.0.weight", "model.mm_projector.0.bias",
        "model.vision_tower.vision_tower.encoder.layers.0.mlp.fc1.weight",
        "model.vision_tower.vision_tower.encoder.layers.0.mlp.fc1.bias", "lm_head.weight", "frozen.weight")}
    params["frozen.weight"].requires_grad_(False)
    decay = {"model.layers.0.self_attn.q_proj.weight", "model.mm_projector.0.weight", "lm_head.weight",
             "model.vision_tower.vision_tower.encoder.layers.0.mlp.fc1.weight", "frozen.weight"}
    groups = build_param_groups(params.items(), decay, learning_rate=1e-4, weight_decay=0.1,
                                mm_projector_lr=1e-3, vision_tower_lr=1e-6)
    by_name = {g["name"]: g for g in groups}
    ids = {id(p): n for n, p in params.items()}
    members = {name: {ids[id(p)] for p in g["params"]} for name, g in by_name.items()}
    assert members == {
        "llm": {"model.layers.0.self_attn.q_proj.weight", "lm_head.weight"},
        "llm_no_decay": {"model.layers.0.input_layernorm.weight", "model.norm.weight"},
        "projector": {"model.mm_projector.0.weight"},
        "projector_no_decay": {"model.mm_projector.0.bias"},
        "vision_tower": {"model.vision_tower.vision_tower.encoder.layers.0.mlp.fc1.weight"},
        "vision_tower_no_decay": {"model.vision_tower.vision_tower.encoder.layers.0.mlp.fc1.bias"},
    }
    assert {n: (g["lr"], g["weight_decay"]) for n, g in by_name.items()} == {
        "llm": (1e-4, 0.1), "llm_no_decay": (1e-4, 0.0), "projector": (1e-3, 0.1),
        "projector_no_decay": (1e-3, 0.0), "vision_tower": (1e-6, 0.1), "vision_tower_no_decay": (1e-6, 0.0)}
    # Without component learning rates everything uses the base rate; empty groups are dropped.
    only_llm = build_param_groups([(n, params[n]) for n in ("lm_head.weight",)], decay, 1e-4, 0.0)
    assert [(g["name"], g["lr"]) for g in only_llm] == [("llm", 1e-4)]


def _optimizer_groups(run) -> dict:
    names = {id(p): n for n, p in run.model.named_parameters()}
    return {g["name"]: (g["initial_lr"], g["weight_decay"], {names[id(p)] for p in g["params"]})
            for g in run.trainer.optimizer.param_groups}


def test_trainer_optimizer_uses_the_param_groups(tmp_path_factory):
    groups = _optimizer_groups(RUNS["stage2_full"](tmp_path_factory))
    assert {n: g[:2] for n, g in groups.items()} == {
        "llm": (1e-3, 0.1), "llm_no_decay": (1e-3, 0.0), "projector": (1e-2, 0.1),
        "projector_no_decay": (1e-2, 0.0), "vision_tower": (1e-5, 0.1), "vision_tower_no_decay": (1e-5, 0.0)}
    assert all("norm" in n or n.endswith("bias") for n in groups["llm_no_decay"][2] | groups["projector_no_decay"][2])
    assert "lm_head.weight" in groups["llm"][2] and "model.norm.weight" in groups["llm_no_decay"][2]

    lora = _optimizer_groups(RUNS["stage2_lora"](tmp_path_factory))
    assert {n: g[:2] for n, g in lora.items()} == {"llm": (1e-3, 0.0), "projector": (3e-3, 0.0),
                                                   "projector_no_decay": (3e-3, 0.0)}
    assert all("lora_" in n for n in lora["llm"][2]) and len(lora["projector"][2] | lora["projector_no_decay"][2]) == 4


def test_modality_grouping_checkpointing_and_accumulation_train_together(bases, tmp_path):
    run = train(run_config(bases, tmp_path, "stage2_lora", "training.max_steps=2", "training.save_steps=2",
                           "training.gradient_checkpointing=true", "training.group_by_modality_length=true",
                           "training.gradient_accumulation_steps=2"))
    assert run.outcome.global_step == 2 and all(torch.isfinite(torch.tensor(_losses(run))))
    assert not torch.equal(run.initial_projector["model.mm_projector.0.weight"],
                           projector_state_dict(run.model)["model.mm_projector.0.weight"])
    sampler = run.trainer._get_train_sampler()
    assert isinstance(sampler, ModalityGroupedSampler) and sampler.megabatch_size == 16
    # 38 records with an image and 2 without: 4 image-only batches of 8, then the leftovers (6 + 2) together.
    batches = list(run.trainer.get_train_dataloader())
    with_images = [int(b["pixel_values"].shape[0]) for b in batches]
    assert with_images == [8, 8, 8, 8, 6]
    run.trainer.length_grouping = 2  # training.length_grouping: megabatches of 2 steps cut into step batches
    run.trainer.group_by_modality_length = False  # implied by length_grouping > 1
    sampler = run.trainer._get_train_sampler()
    assert isinstance(sampler, ModalityGroupedSampler) and (sampler.megabatch_size, sampler.batch_size) == (32, 8)


def _losses(run):
    return [row["loss"] for row in run.outcome.log_history if "loss" in row]


def test_lora_adapter_holds_only_lora_weights_not_the_resized_embeddings(tmp_path_factory):
    from safetensors.torch import load_file

    run = RUNS["stage2_lora"](tmp_path_factory)
    for directory in [run.output_dir, *_checkpoints(run)]:
        keys = load_file(str(directory / "adapter_model.safetensors")).keys()
        assert keys and all("lora_" in key for key in keys), sorted(k for k in keys if "lora_" not in k)
