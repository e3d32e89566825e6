"""Builders: shipped tiny config -> working model; local Llama / CLIP directories really loaded; clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_fixtures import TINY_VISION
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from vir.models import LlavaLlamaForCausalLM, build_all, build_model, build_tokenizer
from vir.models.projector import projector_state_dict, save_projector
from vir.utils.config import ConfigError, compose_config


def _prompt_ids(model, tokenizer, num_images=1):
    text = tokenizer("Describe the image.", return_tensors="pt")["input_ids"][0]
    image = torch.full((model.config.num_image_tokens * num_images,), model.config.image_token_id)
    return torch.cat([text[:1], image, text[1:]])[None]


def test_build_all_from_the_shipped_tiny_config(tokenizer_dir):
    cfg = compose_config(["model=tiny", f"model.tokenizer_path={tokenizer_dir}"])  # model/tiny.yaml alone
    model, tokenizer, processor = build_all(cfg)
    config = model.config
    assert isinstance(model, LlavaLlamaForCausalLM)
    assert config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert (config.num_image_tokens, config.mm_hidden_size, config.hidden_size) == (16, 32, 64)
    assert config.image_aspect_ratio == cfg.data.image_aspect_ratio and config.tokenizer_model_max_length == 512
    assert not any(p.requires_grad for p in model.get_vision_tower().parameters())
    assert all(p.requires_grad for p in model.get_model().mm_projector.parameters())
    assert processor.crop_size == {"height": 32, "width": 32}

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    pixel_values = processor(images=[image], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    ids = _prompt_ids(model, tokenizer)
    out = model(input_ids=ids, pixel_values=pixel_values, labels=ids)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama saved with the (unprepared) tokenizer, vocabulary = the tokenizer's."""
    out = tmp_path_factory.mktemp("llama")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _save_clip(directory, layout):
    """Save a tiny CLIP tower (16 px, 8 px patches); returns its vision model for weight comparisons."""
    torch.manual_seed(1)
    if layout == "full_clip":
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
        model = CLIPModel(CLIPConfig(vision_config=TINY_VISION, text_config=text, projection_dim=16))
        processor = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        processor.save_pretrained(directory)
        model.save_pretrained(directory)
        return model.vision_model
    model = CLIPVisionModel(CLIPVisionConfig(**TINY_VISION))
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("layout", ["clip_vision", "full_clip"])
def test_build_all_loads_local_llama_and_clip_directories(tmp_path, llm_dir, layout):
    reference_tower = _save_clip(tmp_path, layout)
    reference_llm = LlamaForCausalLM.from_pretrained(llm_dir)
    cfg = compose_config(["model=tiny", f"model.llm.path={llm_dir}", f"model.vision_tower.path={tmp_path}"])
    model, tokenizer, processor = build_all(cfg)

    assert model.config.hidden_size == 48 and model.config.vision_config.image_size == 16  # read from the dirs
    assert model.config.num_image_tokens == 4 and model.config.mm_vision_tower == str(tmp_path)
    old_rows = reference_llm.get_input_embeddings().weight
    for new, old in ((model.get_input_embeddings().weight, old_rows),
                     (model.get_output_embeddings().weight, reference_llm.get_output_embeddings().weight)):
        assert new.shape[0] == len(tokenizer) == old.shape[0] + 1  # the added <image> token
        assert torch.equal(new[: old.shape[0]], old)
        torch.testing.assert_close(new[-1], old.mean(dim=0))  # mean-initialised, never garbage
    for key, value in reference_llm.model.layers[1].state_dict().items():
        assert torch.equal(model.get_model().layers[1].state_dict()[key], value), key
    for key, value in reference_tower.state_dict().items():
        assert torch.equal(model.get_vision_tower().vision_tower.state_dict()[key], value), key
    assert processor.crop_size == {"height": 16, "width": 16}

    pixel_values = torch.randn(2, 3, 16, 16)
    logits = model(input_ids=_prompt_ids(model, tokenizer, num_images=2), pixel_values=pixel_values).logits
    assert torch.isfinite(logits).all()


def test_build_model_dtype_and_pretrained_projector(tmp_path, tokenizer_dir):
    cfg = compose_config(["model=tiny", f"model.tokenizer_path={tokenizer_dir}"])
    tokenizer = build_tokenizer(cfg.model)
    torch.manual_seed(0)
    stage1 = build_model(cfg.model, tokenizer)
    path = save_projector(stage1, tmp_path)
    cfg = compose_config(["model=tiny", f"model.tokenizer_path={tokenizer_dir}", f"model.pretrained_projector={path}",
                          "model.llm.dtype=bfloat16", "model.vision_tower.freeze=false"])
    torch.manual_seed(1)
    model = build_model(cfg.model, tokenizer)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in model.parameters())
    for key, value in projector_state_dict(stage1).items():
        assert torch.equal(projector_state_dict(model)[key], value.to(torch.bfloat16)), key


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ([], ValueError, r"set model.tokenizer_path \(or model.llm.path\)"),
        (["model.tokenizer_path=/no/such/dir"], FileNotFoundError, "model.tokenizer_path=/no/such/dir"),
        (["model.llm.path=/no/such/llm"], FileNotFoundError, "model.llm.path=/no/such/llm"),
        (["+TOK", "model.llm.path=+EMPTY"], ConfigError, "model.llm.path=.* has no config.json"),
        (["+TOK", "model.vision_tower.path=/no/clip"], FileNotFoundError, "model.vision_tower.path=/no/clip"),
        (["+TOK", "model.vision_tower.path=+EMPTY"], ConfigError, "model.vision_tower.path=.* no config.json"),
        (["+TOK", "model.projector_type=mlp"], ValueError, "'mlp' .*model.projector_type"),
        (["+TOK", "model.vision_tower.select_feature=cls"], ValueError, "model.vision_tower.select_feature"),
        (["+TOK", "model.llm.dtype=fp8"], ValueError, "model.llm.dtype"),
        (["+TOK", "model.pretrained_projector=/no/proj.bin"], FileNotFoundError, "model.pretrained_projector"),
    ],
)
def test_user_errors_name_the_config_key(tmp_path, tokenizer_dir, overrides, error, message):
    tokens = {"+TOK": f"model.tokenizer_path={tokenizer_dir}", "+EMPTY": str(tmp_path)}
    resolved = [tokens.get(o, o.replace("+EMPTY", str(tmp_path))) for o in overrides]
    with pytest.raises(error, match=message):
        build_all(compose_config(["model=tiny", *resolved]))


def test_processor_and_tower_size_mismatch_is_reported(tmp_path, tokenizer_dir):
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(tmp_path)
    CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(tmp_path)
    cfg = compose_config(["model=tiny", f"model.tokenizer_path={tokenizer_dir}", f"model.vision_tower.path={tmp_path}"])
    with pytest.raises(ValueError, match="makes 24x24 images but the vision tower expects 16x16"):
        build_all(cfg)


def test_a_saved_llava_model_can_be_the_llm_path(tmp_path, tokenizer_dir):
    cfg = compose_config(["model=tiny", f"model.tokenizer_path={tokenizer_dir}", "model.projector_type=linear"])
    model, tokenizer, _ = build_all(cfg)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded, reloaded_tokenizer, _ = build_all(compose_config(["model=tiny", f"model.llm.path={tmp_path}",
                                                                "model.projector_type=linear"]))
    assert len(reloaded_tokenizer) == len(tokenizer) == reloaded.config.vocab_size
    assert reloaded.config.vision_config.to_dict() == model.config.vision_config.to_dict()
    ids = _prompt_ids(model, tokenizer)
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids, pixel_values=pixel_values).logits
        assert torch.equal(reloaded.eval()(input_ids=ids, pixel_values=pixel_values).logits, expected)


def test_loading_a_plain_llama_reports_only_llm_weights_it_lacks(tmp_path, llm_dir, caplog):
    """The tower/projector keys a Llama directory cannot hold are expected (no transformers load table);
    an LLM weight that is really missing is still named."""
    from safetensors.torch import load_file, save_file

    cfg = compose_config(["model=tiny", f"model.llm.path={llm_dir}"])
    with caplog.at_level("WARNING"):
        build_all(cfg)
    assert "LOAD REPORT" not in caplog.text and "lacks" not in caplog.text

    broken = tmp_path / "llama"
    broken.mkdir()
    for item in llm_dir.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    weights = load_file(llm_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_all(compose_config(["model=tiny", f"model.llm.path={broken}"]))
    assert "model.layers.1.mlp.up_proj.weight" in caplog.text and "lacks 1 weights" in caplog.text
    assert "LOAD REPORT" not in caplog.text


def test_a_saved_llava_dir_without_its_projector_is_reported(tmp_path, tokenizer_dir, caplog):
    """For a saved LLaVA directory the tower and projector are part of the checkpoint: missing ones are named."""
    from safetensors.torch import load_file, save_file

    overrides = ["model.projector_type=linear"]
    model, tokenizer, _ = build_all(compose_config(["model=tiny", *overrides, f"model.tokenizer_path={tokenizer_dir}"]))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "mm_projector" not in k}
    assert len(kept) < len(weights)
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        build_all(compose_config(["model=tiny", *overrides, f"model.llm.path={tmp_path}"]))
    assert "lacks 2 weights" in caplog.text and "model.mm_projector.weight" in caplog.text
    assert "LOAD REPORT" not in caplog.text


def _decoder_layer(h: int, i: int, heads: int, kv_heads: int, qkv_bias: bool = False) -> int:
    """Weights of a Llama-style decoder layer: q and o (h x h), k and v (h x kv width), gate, up and down (h x i),
    two RMSNorms; Qwen2's q/k/v biases."""
    kv = h // heads * kv_heads
    return 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h + ((h + 2 * kv) if qkv_bias else 0)


# group: (family, (hidden, intermediate, layers, heads, kv heads), vocabulary, decoder weights, LLM weights (embeddings,
# lm_head and final norm included) within 1 %, tower weights range, image tokens, tower width)
MODEL_GROUPS = {
    "llama3_8b_clip_l336": ("llama", (4096, 14336, 32, 32, 8), None, 32 * _decoder_layer(4096, 14336, 32, 8), None,
                            (0.30e9, 0.31e9), 576, 1024),
    "vicuna7b_clip_l336": ("llama", (4096, 11008, 32, 32, 32), 32000, 32 * _decoder_layer(4096, 11008, 32, 32), 6.74e9,
                           (0.30e9, 0.31e9), 576, 1024),
    "mistral7b_clip_l336": ("mistral", (4096, 14336, 32, 32, 8), 32000, 32 * _decoder_layer(4096, 14336, 32, 8), 7.24e9,
                            (0.30e9, 0.31e9), 576, 1024),
    "qwen2_5_7b_siglip_so400m": ("qwen2", (3584, 18944, 28, 28, 4), 152064,
                                 28 * _decoder_layer(3584, 18944, 28, 4, qkv_bias=True), 7.62e9, (0.40e9, 0.43e9), 729,
                                 1152),
}


@pytest.mark.parametrize("group", list(MODEL_GROUPS))
def test_each_real_model_group_builds_its_real_shape_without_weights(tokenizer_dir, group):
    """model=<group> with null paths: the published checkpoints' shapes (Llama-3-8B, Vicuna-7B v1.5, Mistral-7B v0.2,
    Qwen2.5-7B; CLIP-L/336, SigLIP so400m/14-384), on the meta device, with the project's small tokenizer and
    `model.llm.vocab_size` giving the real vocabulary."""
    from vir.models.model_config import build_model_config
    from vir.models.families import llava_model_class

    family, sizes, vocab, decoder, llm_total, tower_range, image_tokens, tower_width = MODEL_GROUPS[group]
    cfg = compose_config([f"model={group}", "model.llm.path=null", "model.vision_tower.path=null",
                          f"model.tokenizer_path={tokenizer_dir}"])
    tokenizer = build_tokenizer(cfg.model)
    config = build_model_config(cfg.model, tokenizer)
    assert config.text_model_type == family
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads) == sizes
    assert config.num_image_tokens == image_tokens and config.mm_hidden_size == tower_width
    if vocab is not None:  # the real vocabulary, not the test tokenizer's few hundred tokens
        assert len(tokenizer) < vocab == config.vocab_size
    with torch.device("meta"):
        model = llava_model_class(config)(config)
    params = {n: p for n, p in model.named_parameters()}  # a tied lm_head is one parameter, listed once
    layers = sum(p.numel() for n, p in params.items() if n.startswith("model.layers."))
    tower = sum(p.numel() for n, p in params.items() if n.startswith("model.vision_tower."))
    projector = sum(p.numel() for n, p in params.items() if n.startswith("model.mm_projector."))
    assert layers == decoder
    assert tower_range[0] < tower < tower_range[1]
    assert projector == tower_width * config.hidden_size + config.hidden_size ** 2 + 2 * config.hidden_size
    if llm_total is not None:
        assert sum(p.numel() for p in params.values()) - tower - projector == pytest.approx(llm_total, rel=0.01)
