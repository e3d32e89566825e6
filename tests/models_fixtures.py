"""Tiny model helpers shared by tests/test_models_*.py (plain functions: import them, no conftest changes)."""

from __future__ import annotations

import torch

from vir.models import LlavaLlamaConfig, LlavaLlamaForCausalLM

TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
}
TINY_TEXT = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
IMAGE_TOKEN_ID = 95


def tiny_config(**overrides) -> LlavaLlamaConfig:
    """A 2-layer, hidden-32 LLaVA config: 16 px images, 8 px patches -> 4 image tokens per image."""
    fields = {**TINY_TEXT, "vision_config": dict(TINY_VISION), "image_token_id": IMAGE_TOKEN_ID}
    fields.update(overrides)
    return LlavaLlamaConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> LlavaLlamaForCausalLM:
    """A random tiny LlavaLlamaForCausalLM in eval mode (deterministic for a given seed)."""
    torch.manual_seed(seed)
    return LlavaLlamaForCausalLM(tiny_config(**overrides)).eval()


def text_ids(generator: torch.Generator, length: int) -> torch.Tensor:
    """[length] random ordinary token ids (never pad 0, bos 1, eos 2 or the image token)."""
    return torch.randint(3, IMAGE_TOKEN_ID, (length,), generator=generator)


def image_ids(num_image_tokens: int) -> torch.Tensor:
    """[num_image_tokens] copies of the image token: one image, expanded as the tokeniser does."""
    return torch.full((num_image_tokens,), IMAGE_TOKEN_ID)
