"""Tiny random checkpoints of each LLM family and each vision tower, in the real on-disk formats.

Each LLM directory is what `save_pretrained` writes for that family (config.json with its own `model_type`,
model.safetensors) plus the family's tiny tokenizer (`tests/family_tokenizers.py`: its special tokens and its
published chat template). Each tower directory is a CLIP or SigLIP vision model with the image processor its
family ships (`preprocessor_config.json`). Built once per test session and shared:

    case = FAMILY_CASES["qwen2"]                 # the family, its tokenizer, template and tower
    llm = family_llm_dir(tmp_path_factory, "qwen2")
    tower = tower_dir(tmp_path_factory, "siglip")
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict

import pytest
import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from family_tokenizers import FAMILY_TEMPLATES, family_tokenizer


@dataclass(frozen=True)
class FamilyCase:
    """One LLM family as users bring it: transformers' model_type, the tokenizer family, the named template its
    LLaVA checkpoints use, the tower it is paired with, and config fields of its own."""

    model_type: str
    tokenizer: str
    tower: str  # "clip" | "siglip"
    fields: Dict[str, object] = field(default_factory=dict)

    @property
    def template(self) -> str:
        return FAMILY_TEMPLATES[self.tokenizer]


# Small Qwen2 and Gemma tie their input and output embeddings; Gemma 2 softcaps its logits.
FAMILY_CASES = {
    "llama3": FamilyCase("llama", "llama3", "clip"),
    "vicuna": FamilyCase("llama", "vicuna", "clip"),
    "mistral": FamilyCase("mistral", "mistral", "clip", {"sliding_window": None}),
    "qwen2": FamilyCase("qwen2", "qwen2", "siglip", {"tie_word_embeddings": True}),
    "qwen3": FamilyCase("qwen3", "qwen2", "siglip", {"tie_word_embeddings": True}),
    "gemma2": FamilyCase("gemma2", "gemma", "siglip", {"final_logit_softcapping": 30.0, "tie_word_embeddings": True,
                                                      "query_pre_attn_scalar": 8}),
    "gemma3_text": FamilyCase("gemma3_text", "gemma", "siglip", {"tie_word_embeddings": True,
                                                                "query_pre_attn_scalar": 8}),
    "phi3": FamilyCase("phi3", "phi3", "clip"),
}
LLM_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
# CLIP: 16 px / 8 px patches = 4 tokens (CLS dropped); SigLIP: 28 px / 14 px patches = 4 tokens, none dropped.
TOWER_SIZES = {"clip": dict(image_size=16, patch_size=8), "siglip": dict(image_size=28, patch_size=14)}
TOWER_WIDTH = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
NUM_IMAGE_TOKENS = 4


def _once_per_session(build):
    cache: dict = {}

    @functools.wraps(build)
    def cached(factory: pytest.TempPathFactory, *args):
        key = (id(factory), *args)
        if key not in cache:
            cache[key] = (factory, build(factory, *args))
        return cache[key][1]

    return cached


def llm_config(case: FamilyCase, vocab_size: int, tokenizer):
    """The family's own config at the tiny shape, its special-token ids from `tokenizer`."""
    config_class = CONFIG_MAPPING[case.model_type]
    known = config_class().to_dict()
    fields = {k: v for k, v in {**LLM_SIZES, **case.fields}.items() if k in known}
    return config_class(vocab_size=vocab_size, initializer_range=0.1, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **fields)


@_once_per_session
def family_llm_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    """A random tiny LLM of `FAMILY_CASES[name]` saved with its tokenizer (seeded: the same bytes every session)."""
    case = FAMILY_CASES[name]
    directory = factory.mktemp(f"llm_{name}")
    tokenizer = family_tokenizer(case.tokenizer, directory)
    config = llm_config(case, len(tokenizer), tokenizer)
    torch.manual_seed(0)
    model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
    model.save_pretrained(str(directory))
    return directory


@_once_per_session
def tower_dir(factory: pytest.TempPathFactory, kind: str) -> Path:
    """A random tiny CLIP or SigLIP vision model with its family's image processor."""
    directory = factory.mktemp(f"tower_{kind}")
    sizes = {**TOWER_WIDTH, **TOWER_SIZES[kind]}
    torch.manual_seed(1)
    if kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**sizes)).save_pretrained(str(directory))
        size = sizes["image_size"]
        CLIPImageProcessorPil(size={"shortest_edge": size},
                              crop_size={"height": size, "width": size}).save_pretrained(str(directory))
    else:
        SiglipVisionModel(SiglipVisionConfig(**sizes)).save_pretrained(str(directory))
        size = sizes["image_size"]
        SiglipImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3).save_pretrained(str(directory))
    return directory


def family_overrides(factory: pytest.TempPathFactory, name: str) -> list:
    """`model=tiny` overrides pointing at the family's tiny LLM and its tower, with the family's template."""
    case = FAMILY_CASES[name]
    return ["model=tiny", f"model.llm.path={family_llm_dir(factory, name)}",
            f"model.vision_tower.path={tower_dir(factory, case.tower)}", f"data.template={case.template}",
            "model.model_max_length=256"]
