"""Every LLM family and both towers through the model code: build from real-format directories, train a step,
the chunked loss, save and reload, generate; and the one-line refusals of what is not a decoder LLM or a tower."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    BartConfig,
    CLIPVisionConfig,
    Gemma3Config,
    LlavaConfig,
    LlavaNextConfig,
    Siglip2VisionConfig,
    SiglipImageProcessorPil,
    T5Config,
)

from family_models import FAMILY_CASES, NUM_IMAGE_TOKENS, family_llm_dir, family_overrides, tower_dir
from vir.data.images import preprocess_images
from vir.models.builder import build_all, build_tokenizer
from vir.models.model_config import build_model_config
from vir.models.model_types import check_model_dir
from vir.training.preflight import check_run
from vir.utils.config import ConfigError, compose_config

FAMILIES = sorted(FAMILY_CASES)


def _batch(tokenizer, config, num_images: int = 1):
    """Two rows: one with `num_images` image blocks, one text-only; labels on the text after the images."""
    text = tokenizer("what colour is the square", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" red", add_special_tokens=False)["input_ids"]
    image_ids = [config.image_token_id] * config.num_image_tokens * num_images
    rows = [image_ids + text + answer, text + answer + text]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    labels[input_ids == config.image_token_id] = -100
    return input_ids, attention_mask, labels


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (model, tokenizer, image_processor, cfg), built once per family."""
    cache = {}

    def build(name):
        if name not in cache:
            cfg = compose_config(family_overrides(tmp_path_factory, name))
            cache[name] = (*build_all(cfg), cfg)
        return cache[name]

    return build


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_builds_as_its_own_llava_class(name, built):
    case = FAMILY_CASES[name]
    model, tokenizer, _, _ = built(name)
    assert model.config.model_type == f"llava_{case.model_type}"
    assert model.config.text_model_type == case.model_type
    assert type(model).__mro__[2].__name__ == type(model).__name__.removeprefix("Llava")
    assert model.config.num_image_tokens == NUM_IMAGE_TOKENS
    assert model.get_vision_tower().config.model_type == f"{case.tower}_vision_model"
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    if case.fields.get("tie_word_embeddings"):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_trains_a_step_and_the_chunked_loss_equals_transformers(name, built):
    model, tokenizer, _, _ = built(name)
    config = model.config
    input_ids, attention_mask, labels = _batch(tokenizer, config)
    pixel_values = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    model.train()
    try:
        model.loss_chunk_size = 0
        full = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values)
        model.loss_chunk_size = 3
        chunked = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixel_values)
        assert chunked.logits is None  # the chunked path ran: no full logits
    finally:
        model.loss_chunk_size = 0
        model.eval()
    assert torch.isfinite(full.loss)
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-5, atol=1e-5)
    chunked.loss.backward()
    projector_grad = model.get_model().mm_projector[0].weight.grad
    assert projector_grad is not None and projector_grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_saves_reloads_and_generates_from_its_images(name, built, tmp_path):
    model, tokenizer, _, _ = built(name)
    config = model.config
    input_ids, attention_mask, _ = _batch(tokenizer, config)
    input_ids = input_ids[:1, :int(attention_mask[0].sum())]  # the image row, without its padding
    pixel_values = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == f"llava_{FAMILY_CASES[name].model_type}"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        torch.testing.assert_close(reloaded(input_ids=input_ids, pixel_values=pixel_values).logits, logits)
        generated = model.generate(input_ids=input_ids, pixel_values=pixel_values, max_new_tokens=3,
                                   do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert input_ids.shape[1] < generated.shape[1] <= input_ids.shape[1] + 3
    assert generated[0, input_ids.shape[1]].item() == logits[0, -1].argmax().item()


def test_a_random_init_llm_of_any_family_from_the_size_keys(tmp_path_factory):
    cfg = compose_config(["model=tiny", "model.llm.path=null", "model.llm.model_type=qwen2",
                          "model.llm.tie_word_embeddings=true", "model.vision_tower.path=null",
                          "model.vision_tower.model_type=siglip_vision_model", "model.vision_tower.image_size=28",
                          "model.vision_tower.patch_size=14",
                          f"model.tokenizer_path={family_llm_dir(tmp_path_factory, 'qwen2')}"])
    model, _, processor = build_all(cfg)
    assert type(model).__name__ == "LlavaQwen2ForCausalLM"
    assert model.config.num_image_tokens == 4  # 28 / 14 = 2 patches a side, no CLS
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert isinstance(processor, SiglipImageProcessorPil)


def test_an_unknown_random_init_family_names_the_key(tmp_path_factory):
    cfg = compose_config(["model=tiny", "model.llm.path=null", "model.llm.model_type=t5",
                          f"model.tokenizer_path={family_llm_dir(tmp_path_factory, 'qwen2')}"])
    with pytest.raises(ConfigError, match=r"^model\.llm\.model_type=t5 is"):
        build_model_config(cfg.model, build_tokenizer(cfg.model))


def test_siglip_keeps_every_token_and_pads_with_its_processors_mean(tmp_path_factory, built):
    model, _, processor, _ = built("qwen2")
    assert isinstance(processor, SiglipImageProcessorPil)
    wide = Image.new("RGB", (56, 28), (255, 0, 0))
    pixels = preprocess_images([wide], processor, "pad")
    assert pixels.shape == (1, 3, 28, 28)
    # The square's top rows are padding in SigLIP's mean colour (0.5): about 0 after normalisation.
    assert pixels[0, :, 0].abs().max() < 0.01
    features = model.get_vision_tower()(pixels)
    assert features.shape == (1, NUM_IMAGE_TOKENS, model.get_vision_tower().hidden_size)


def _saved(directory, config):
    config.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("config, found", [
    (T5Config(), "'t5' model (not a causal language model"),
    (BartConfig(), "'bart' model (an encoder-decoder model)"),
    (Gemma3Config(), "'gemma3' model (a multimodal model)"),
    (LlavaConfig(), "'llava' model (an llava-hf LlavaForConditionalGeneration: import it with model.init_from_hf)"),
    (LlavaNextConfig(), "'llava_next' model (LLaVA-NeXT"),
    (CLIPVisionConfig(), "'clip_vision_model' model (not a causal language model"),
], ids=["t5", "bart", "gemma3-multimodal", "llava-hf", "llava-next", "clip"])
def test_what_is_not_a_decoder_llm_is_refused_in_one_line(config, found, tmp_path):
    _saved(tmp_path, config)
    with pytest.raises(ConfigError) as err:
        check_model_dir(tmp_path, "model.llm.path")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"model.llm.path={tmp_path} holds a {found}")
    assert "qwen2" in message and "llava_<family>" in message


def test_llava_next_as_init_from_hf_and_siglip2_as_the_tower_are_refused(tmp_path):
    _saved(tmp_path / "next", LlavaNextConfig())
    with pytest.raises(ConfigError, match=r"model\.init_from_hf=\S+ holds a 'llava_next' model \(LLaVA-NeXT"):
        check_model_dir(tmp_path / "next", "model.init_from_hf")
    _saved(tmp_path / "siglip2", Siglip2VisionConfig())
    with pytest.raises(ConfigError, match=r"holds a 'siglip2_vision_model' model; model\.vision_tower\.path takes "
                                          r"clip or clip_vision_model or siglip or siglip_vision_model"):
        check_model_dir(tmp_path / "siglip2", "model.vision_tower.path")


def test_the_preflight_refuses_a_qwen2_directory_as_the_tower(tmp_path_factory, tmp_path):
    overrides = family_overrides(tmp_path_factory, "qwen2")
    llm = family_llm_dir(tmp_path_factory, "qwen2")
    cfg = compose_config([*overrides, f"model.vision_tower.path={llm}", f"training.output_dir={tmp_path / 'run'}",
                          f"data.train_path={tmp_path / 'train.json'}"])
    with pytest.raises(ConfigError, match=r"holds a 'qwen2' model; model\.vision_tower\.path takes clip"):
        check_run(cfg)


def test_the_tower_of_a_saved_run_must_match_the_configured_kind(tmp_path_factory, built):
    model, _, _, _ = built("llama3")  # a CLIP tower
    with pytest.raises(Exception, match="holds a siglip_vision_model tower but the model was configured with a "
                                        "clip_vision_model one"):
        model.get_vision_tower().load_pretrained_weights(tower_dir(tmp_path_factory, "siglip"))


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_reads_packed_rows_as_the_separate_samples(name, built):
    """Two samples in one row (position ids restarting, no attention mask) give the padded batch's loss: no family
    lets a sample attend across the boundary."""
    from vir.data.collator import DataCollatorForSupervisedDataset
    from vir.data.packing import pack_batch

    model, tokenizer, _, _ = built(name)
    config = model.config
    input_ids, attention_mask, labels = _batch(tokenizer, config)
    size = config.vision_config.image_size
    items = [{"input_ids": ids[mask.bool()].tolist(), "labels": lab[mask.bool()].tolist()}
             for ids, mask, lab in zip(input_ids, attention_mask, labels)]
    for item in items:
        item["labels"][0] = -100  # packing never trains a sample's first token: nor does the padded reference here
    pixel_values = torch.randn(1, 3, size, size)
    items[0]["pixel_values"], items[1]["pixel_values"] = pixel_values, torch.zeros(0, 3, size, size)
    padded = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    packed = pack_batch(items, tokenizer.pad_token_id, row_tokens=sum(len(i["input_ids"]) for i in items))
    assert packed["input_ids"].shape[0] == 1
    with torch.no_grad():
        reference = model(**padded).loss
        together = model(**packed).loss
    torch.testing.assert_close(together, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "phi3"])
def test_qlora_trains_a_step_on_each_kind_of_family(name, tmp_path_factory, tmp_path):
    """nf4 on a tied-embedding Qwen2, a softcapped Gemma 2 and Phi-3's fused projections: the decoder's linears
    go 4-bit, the head and tower stay full precision, LoRA trains."""
    import bitsandbytes as bnb
    from training_fixtures import Bases, run_overrides, synthetic_data, train

    case = FAMILY_CASES[name]
    bases = Bases(synthetic_data(tmp_path_factory), family_llm_dir(tmp_path_factory, name),
                  tower_dir(tmp_path_factory, case.tower))
    overrides = [o for o in run_overrides(bases, tmp_path / "run", "stage2_lora")
                 if not o.startswith(("data.template=", "training.max_steps=", "model.model_max_length="))]
    run = train(compose_config([*overrides, f"data.template={case.template}", "training.max_steps=1",
                                "model.llm.quantization=nf4", "model.llm.dtype=bfloat16", "model.model_max_length=256"]))
    assert run.outcome.global_step == 1
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    base = run.model.get_base_model()
    decoder = [m for name, m in base.get_model().layers.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name]  # the base layers, not LoRA's own
    assert decoder and all(isinstance(m, bnb.nn.Linear4bit) for m in decoder)
    assert type(base.lm_head) is torch.nn.Linear and base.lm_head.weight.dtype == torch.bfloat16
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.get_model().vision_tower.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in base.get_model().mm_projector.modules())


def test_vir_train_refuses_an_encoder_decoder_llm_with_exit_status_2(tmp_path_factory, tmp_path, monkeypatch, capsys):
    from training_fixtures import vir_train_fails

    _saved(tmp_path / "t5", T5Config())
    overrides = [*family_overrides(tmp_path_factory, "qwen2"), f"model.llm.path={tmp_path / 't5'}",
                 f"data.train_path={tmp_path / 'train.json'}", f"training.output_dir={tmp_path / 'run'}"]
    line = vir_train_fails(monkeypatch, capsys, overrides)
    assert f"model.llm.path={tmp_path / 't5'} holds a 't5' model" in line and "decoder-only causal LM" in line


def test_llava_anyres_checkpoints_are_refused_not_loaded_as_llava_15(tmp_path):
    """LLaVA's own LLaVA-1.6 / OneVision checkpoints name a decoder family (`llava_mistral`, `llava_qwen`) but tile
    images (anyres): refused in one line instead of loading as a LLaVA-1.5 model with the tiling dropped."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_mistral", "image_aspect_ratio": "anyres",
                                                      "mm_patch_merge_type": "spatial_unpad"}))
    with pytest.raises(ConfigError, match=r"holds a 'llava_mistral' model \(a LLaVA-NeXT / OneVision checkpoint "
                                          r"\(image_aspect_ratio=anyres, anyres tiling\)"):
        check_model_dir(tmp_path, "model.llm.path")
