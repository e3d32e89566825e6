"""`model.init_from_hf` on llava-hf checkpoints of other families: LLaVA-1.5's own (a Vicuna / Llama-2 text model,
CLIP, the published llava-1.5 chat template) and a Qwen2 + SigLIP one. Imported, trained one step at learning rate
0 and exported, each computes the source's logits; LLaVA-1.5's trains with its own conversation format
(`data.template=vicuna_v1`), and the Llama-3 default says in one line which template fits instead."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2Config,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from family_models import TOWER_SIZES, TOWER_WIDTH
from family_tokenizers import TEMPLATE_FILES, family_tokenizer
from training_fixtures import Bases, run_overrides, synthetic_data, vir_train, vir_train_fails
from vir.data.collator import DataCollatorForSupervisedDataset
from vir.data.dataset import LazySupervisedDataset
from vir.export.hf_llava import export_hf_llava
from vir.models.builder import build_all
from vir.models.checkpoint import load_run
from vir.models.hf_import import apply_init_from_hf
from vir.utils.config import compose_config

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)
# name -> (tokenizer family, text config class, tower, named template); small Qwen2 ties its embeddings, and
# transformers saves a tied Llava without `lm_head.weight`.
CHECKPOINTS = {"llava-1.5 (vicuna)": ("vicuna", LlamaConfig, "clip", "vicuna_v1"),
               "qwen2 + siglip, tied": ("qwen2", Qwen2Config, "siglip", "chatml")}


def _llava_hf_dir(directory, name):
    """A directory shaped like llava-hf/llava-1.5-7b-hf: LlavaForConditionalGeneration weights, the LLM's
    tokenizer with `<image>`, the tower's image processor and the published chat template."""
    family, text_class, tower, _ = CHECKPOINTS[name]
    tokenizer = family_tokenizer(family, directory)
    if tokenizer.pad_token is None:  # llava-hf's LLaVA-1.5 added `<pad>` (and `<image>`) to Vicuna's vocabulary
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    sizes = {**TOWER_WIDTH, **TOWER_SIZES[tower]}
    clip = tower == "clip"
    vision = CLIPVisionConfig(**sizes) if clip else SiglipVisionConfig(**sizes)
    text = text_class(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings="tied" in name, **TEXT)
    config = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default" if clip else "full", vision_feature_layer=-2,
                         image_seq_length=4)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(str(directory))
    size = sizes["image_size"]
    image_processor = (CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
                       if clip else SiglipImageProcessorPil(size={"height": size, "width": size}))
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=sizes["patch_size"],
                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                   chat_template=TEMPLATE_FILES[family].read_text(),
                   num_additional_image_tokens=1 if clip else 0).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    return request.param, _llava_hf_dir(tmp_path_factory.mktemp("llava_hf"), request.param)


def _overrides(factory, source, output_dir, *extra):
    bases = Bases(synthetic_data(factory), None, None)
    pinned = [o for o in run_overrides(bases, output_dir, "stage2_lora")
              if not o.startswith(("model.llm.path=", "model.vision_tower.path=", "data.template="))]
    return [*pinned, "model.llm.path=null", "model.vision_tower.path=null", f"model.init_from_hf={source}", *extra]


def _batch(factory, tokenizer, processor, config, template):
    data = synthetic_data(factory)
    dataset = LazySupervisedDataset(data.train, tokenizer, processor, template=template,
                                    num_image_tokens=config.num_image_tokens, image_folder=data.root)
    with_images = [i for i, n in enumerate(dataset.modality_lengths) if n > 0][:2]
    text_only = [i for i, n in enumerate(dataset.modality_lengths) if n < 0][:1]
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([dataset[i] for i in with_images + text_only])
    return {k: v for k, v in batch.items() if k != "labels"}


def test_init_from_hf_imports_each_family_exactly(checkpoint, tmp_path_factory, tmp_path):
    name, source = checkpoint
    family, text_class, tower, template = CHECKPOINTS[name]
    cfg = compose_config(_overrides(tmp_path_factory, source, tmp_path / "run", f"data.template={template}"))
    apply_init_from_hf(cfg)
    assert cfg.model.vision_tower.select_feature == "patch"
    ours, tokenizer, processor = build_all(cfg)
    assert ours.config.text_model_type == text_class.model_type
    if "tied" in name:
        assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    assert ours.get_vision_tower().config.model_type == f"{tower}_vision_model"
    hf = LlavaForConditionalGeneration.from_pretrained(str(source)).eval()
    batch = _batch(tmp_path_factory, tokenizer, processor, ours.config, template)
    with torch.no_grad():
        assert (ours.eval()(**batch).logits - hf(**batch).logits).abs().max() < 1e-5


def test_vir_train_continues_each_family_at_lr_0_and_exports_the_source(checkpoint, tmp_path_factory, tmp_path,
                                                                        monkeypatch, capsys):
    name, source = checkpoint
    template = CHECKPOINTS[name][3]
    overrides = _overrides(tmp_path_factory, source, tmp_path / "run", f"data.template={template}",
                           "training.max_steps=1", "training.learning_rate=0")
    code, err = vir_train(monkeypatch, capsys, overrides)
    assert code in (0, None), err[-3000:]
    out = export_hf_llava(tmp_path / "run", tmp_path / "hf")
    again = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(str(source)).eval()
    model, tokenizer, processor, _ = load_run(tmp_path / "run", device="cpu")
    batch = _batch(tmp_path_factory, tokenizer, processor, model.config, template)
    with torch.no_grad():
        assert (again(**batch).logits - hf(**batch).logits).abs().max() < 1e-4


def test_llava_15_with_the_llama3_default_names_the_template_that_fits(tmp_path_factory, tmp_path, monkeypatch,
                                                                       capsys):
    source = _llava_hf_dir(tmp_path / "llava", "llava-1.5 (vicuna)")
    line = vir_train_fails(monkeypatch, capsys, _overrides(tmp_path_factory, source, tmp_path / "run",
                                                           "data.template=llama3"))
    assert "data.template=llama3" in line and "<|begin_of_text|>" in line and "vicuna_v1" in line, line
    assert not (tmp_path / "run" / "init_from_hf").exists()  # refused before the checkpoint was read and split
