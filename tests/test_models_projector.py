"""Projector types, LLaVA key layout, and the mm_projector.bin artifact (save / load / peft prefixes / errors)."""

from __future__ import annotations

import pytest
import torch
from models_fixtures import tiny_config, tiny_model
from torch import nn

from vir.models.projector import (
    LlavaMultiModalProjector,
    build_projector,
    load_projector_state_dict,
    projector_state_dict,
    save_projector,
)

MLP_KEYS = {f"model.mm_projector.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")}


@pytest.mark.parametrize(
    "projector_type, keys",
    [
        ("mlp2x_gelu", MLP_KEYS),
        ("linear", {"model.mm_projector.weight", "model.mm_projector.bias"}),
        ("identity", set()),
        ("mlp3x_gelu", MLP_KEYS | {"model.mm_projector.4.weight", "model.mm_projector.4.bias"}),
    ],
)
def test_projector_types_use_llava_key_layout(projector_type, keys):
    model = tiny_model(mm_projector_type=projector_type)
    assert {k for k in model.state_dict() if "mm_projector" in k} == keys
    assert set(projector_state_dict(model)) == keys
    features = torch.randn(2, 4, 32)
    assert model.get_model().mm_projector(features).shape == (2, 4, 32)


def test_mlp2x_gelu_is_linear_gelu_linear():
    projector = build_projector(tiny_config(hidden_size=64))
    assert isinstance(projector, LlavaMultiModalProjector)
    assert [type(m) for m in projector] == [nn.Linear, nn.GELU, nn.Linear]
    assert (projector[0].in_features, projector[0].out_features, projector[2].out_features) == (32, 64, 64)


@pytest.mark.parametrize("filename", ["mm_projector.bin", "mm_projector.safetensors", None])
def test_save_then_load_restores_the_projector(tmp_path, filename):
    source, target = tiny_model(seed=1), tiny_model(seed=2)
    written = save_projector(source, tmp_path / filename if filename else tmp_path)
    assert written.name == (filename or "mm_projector.bin")
    if written.suffix == ".bin":
        assert set(torch.load(written, weights_only=True)) == MLP_KEYS
    load_projector_state_dict(target, written if filename else tmp_path)
    for key, value in projector_state_dict(source).items():
        assert torch.equal(projector_state_dict(target)[key], value), key


def test_load_accepts_llava_and_peft_prefixes_and_casts_dtype():
    source, target = tiny_model(seed=1), tiny_model(seed=2).to(torch.bfloat16)
    state = projector_state_dict(source)
    peft_state = {"base_model.model." + k: v for k, v in state.items()}
    load_projector_state_dict(target, peft_state)
    loaded = projector_state_dict(target)
    assert loaded["model.mm_projector.0.weight"].dtype == torch.bfloat16
    expected = state["model.mm_projector.0.weight"].to(torch.bfloat16)
    assert torch.equal(loaded["model.mm_projector.0.weight"], expected)


def test_load_errors_list_missing_and_unexpected_keys(tmp_path):
    model = tiny_model()
    state = projector_state_dict(model)
    broken = {k: v for k, v in state.items() if not k.endswith("2.bias")}
    broken["model.mm_projector.4.weight"] = torch.zeros(1)
    keys = r"missing \['model.mm_projector.2.bias'\], unexpected \['model.mm_projector.4.weight'\]"
    with pytest.raises(ValueError, match=keys):
        load_projector_state_dict(model, broken)
    with pytest.raises(ValueError, match="not projector weights"):
        load_projector_state_dict(model, {**state, "lm_head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="wrong shape"):
        load_projector_state_dict(model, {**state, "model.mm_projector.0.bias": torch.zeros(3)})
    linear_file = save_projector(tiny_model(mm_projector_type="linear"), tmp_path)
    with pytest.raises(ValueError, match="mm_projector_type='mlp2x_gelu'"):
        load_projector_state_dict(model, linear_file)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither mm_projector.bin nor mm_projector.safetensors"):
        load_projector_state_dict(model, tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_projector_state_dict(model, tmp_path / "missing.bin")


def test_projector_artifact_through_a_peft_lora_model():
    from peft import LoraConfig, get_peft_model

    model = tiny_model(seed=3)
    expected = projector_state_dict(model)
    lora = LoraConfig(r=4, target_modules=r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    state = projector_state_dict(peft_model)
    assert set(state) == MLP_KEYS and all(torch.equal(state[k], expected[k]) for k in MLP_KEYS)
    prefixed = {k: v for k, v in peft_model.state_dict().items() if "mm_projector" in k}
    assert next(iter(prefixed)).startswith("base_model.model.model.mm_projector.")
    load_projector_state_dict(tiny_model(seed=4), prefixed)
