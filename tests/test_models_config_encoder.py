"""LlavaLlamaConfig (derived shapes, serialisation, Auto registration, errors) and VisionTower."""

from __future__ import annotations

import json

import pytest
import torch
from models_fixtures import TINY_VISION, tiny_config
from transformers import AutoConfig, CLIPConfig, CLIPVisionConfig, CLIPVisionModel

from vir.models import LlavaLlamaConfig
from vir.models.encoder import VisionTower
from vir.utils.config import ConfigError


def test_config_derives_shapes_from_the_vision_config():
    config = tiny_config()
    assert config.mm_hidden_size == 32 and config.num_image_tokens == 4  # (16 // 8) ** 2
    assert tiny_config(mm_vision_select_feature="cls_patch").num_image_tokens == 5
    config.mm_vision_select_feature = "cls_patch"  # derived fields follow later edits too
    assert config.num_image_tokens == 5
    assert LlavaLlamaConfig().num_image_tokens == 576  # default tower: CLIP ViT-L/14-336


def test_config_accepts_vision_config_as_dict_object_or_full_clip():
    as_object = tiny_config(vision_config=CLIPVisionConfig(**TINY_VISION))
    full_clip = CLIPConfig(vision_config=TINY_VISION, text_config={"hidden_size": 32, "num_hidden_layers": 1})
    from_full = tiny_config(vision_config=full_clip)
    from_full_dict = tiny_config(vision_config=full_clip.to_dict())
    for config in (as_object, from_full, from_full_dict):
        assert isinstance(config.vision_config, CLIPVisionConfig)
        assert config.vision_config.hidden_size == 32 and config.num_image_tokens == 4


def test_config_round_trips_through_config_json(tmp_path):
    config = tiny_config(mm_projector_type="linear", mm_vision_select_layer=-1, tokenizer_model_max_length=77)
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored["model_type"] == "llava_llama"
    assert stored["vision_config"]["image_size"] == 16 and stored["num_image_tokens"] == 4
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LlavaLlamaConfig)
    for key in ("mm_projector_type", "mm_vision_select_layer", "image_token_id", "num_image_tokens", "hidden_size"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mm_projector_type": "mlp"}, "mm_projector_type"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature"),
        ({"mm_projector_type": "identity", "hidden_size": 64}, "identity"),
        ({"mm_vision_select_layer": 5}, "mm_vision_select_layer"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


@pytest.mark.parametrize("select_feature, tokens", [("patch", 4), ("cls_patch", 5)])
def test_tower_selects_the_configured_layer_and_tokens(select_feature, tokens):
    torch.manual_seed(0)
    tower = VisionTower.from_config(tiny_config(mm_vision_select_feature=select_feature)).eval()
    pixel_values = torch.randn(3, 3, 16, 16)
    features = tower(pixel_values)
    assert features.shape == (3, tokens, 32)
    hidden = tower.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(features, hidden[:, 1:] if select_feature == "patch" else hidden)


def test_tower_casts_input_to_its_dtype_and_skips_autograd_when_frozen():
    tower = VisionTower(CLIPVisionConfig(**TINY_VISION)).to(torch.bfloat16)
    tower.requires_grad_(False)
    features = tower(torch.randn(2, 3, 16, 16, dtype=torch.float32))
    assert features.dtype == torch.bfloat16 and features.grad_fn is None


@pytest.mark.parametrize("layout", ["clip_vision", "full_clip"])
def test_tower_loads_a_clip_or_clip_vision_directory(tmp_path, layout):
    torch.manual_seed(1)
    if layout == "full_clip":
        from transformers import CLIPModel

        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        saved = CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=text, projection_dim=16))
        reference = saved.vision_model
    else:
        saved = reference = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    saved.save_pretrained(tmp_path)
    weight = reference.embeddings.patch_embedding.weight

    loaded = VisionTower.from_pretrained(tmp_path, select_feature="cls_patch")
    assert torch.equal(loaded.vision_tower.embeddings.patch_embedding.weight, weight)
    assert loaded(torch.randn(1, 3, 16, 16)).shape == (1, 5, 32)

    tower = VisionTower.from_config(tiny_config())
    tower.load_pretrained_weights(tmp_path)
    assert torch.equal(tower.vision_tower.embeddings.patch_embedding.weight, weight)


def test_tower_loading_errors_name_the_key_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"model.vision_tower.path={tmp_path / 'nope'} is not a directory"):
        VisionTower.from_config(tiny_config()).load_pretrained_weights(tmp_path / "nope")
    with pytest.raises(ConfigError, match="has no config.json"):
        VisionTower.from_pretrained(tmp_path)
