"""QLoRA loading: the LLM's linear layers in 4-bit nf4 (or 8-bit) through bitsandbytes, the rest left alone.

`model.llm.quantization: none | nf4 | int8`. The vision tower, the projector and lm_head are never quantized
(`NOT_QUANTIZED`): the tower's features and the projector's trained weights need their precision, and a
4-bit lm_head would be the one place a logit error reaches every token. The quantized model is placed on its
device while it loads (`device_map`): bitsandbytes quantizes as weights arrive, and a 4-bit model cannot be
moved afterwards.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Sequence

import torch
from torch import nn

from vir.utils.config import ConfigError

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "nf4", "int8")
# Module-name prefixes bitsandbytes must leave in full precision (transformers matches them from the start), in
# vir's layout and in transformers' LlavaForConditionalGeneration's (what vir-export writes).
NOT_QUANTIZED = ["model.vision_tower", "model.mm_projector", "lm_head"]
NOT_QUANTIZED_HF_LLAVA = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]


def quantization_config(llm_cfg: Any, compute_dtype: torch.dtype, not_quantized: Sequence[str] = NOT_QUANTIZED):
    """`BitsAndBytesConfig` for `model.llm.quantization` (None for `none`): nf4, with double quantization when
    `model.llm.double_quant`, and `compute_dtype` (the LLM's dtype) matmuls, or LLM.int8; the modules under
    `not_quantized` stay in full precision."""
    kind = getattr(llm_cfg, "quantization", "none")
    if kind not in QUANTIZATIONS:
        raise ConfigError(f"model.llm.quantization={kind!r} is not one of {', '.join(QUANTIZATIONS)}")
    if kind == "none":
        return None
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=llm_cfg.double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype,
                                  llm_int8_skip_modules=list(not_quantized))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(not_quantized))


def quantized_loading(llm_cfg: Any, compute_dtype: torch.dtype) -> Dict[str, Any]:
    """`from_pretrained` keyword arguments that load an LLM as `model.llm.quantization` says: its
    `BitsAndBytesConfig` and this process's device map, or none for `none`."""
    quantized = quantization_config(llm_cfg, compute_dtype)
    return {} if quantized is None else {"quantization_config": quantized, "device_map": load_device_map()}


def load_device_map() -> Dict[str, Any]:
    """Where a quantized model loads: this process's GPU under torchrun (LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))}
    return {"": "cpu"}


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` (or the model a peft wrapper holds) was loaded quantized by bitsandbytes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base, "is_loaded_in_4bit", False)
                or getattr(base, "is_loaded_in_8bit", False))


def ensure_initialised(module: nn.Module, name: str) -> None:
    """Re-initialise, on the CPU, every linear layer of `module` whose weights are not finite or all zero, then put
    it back where it was. Weights absent from a checkpoint are materialised by the loader; under quantized,
    low-memory loading a custom module can come back empty, and a zero projector never learns (LLaVA's QLoRA
    pitfall)."""
    for child_name, child in module.named_modules():
        if not isinstance(child, nn.Linear):
            continue
        weight = child.weight
        if weight.is_meta or not torch.isfinite(weight).all() or not weight.any():
            device = "cpu" if weight.is_meta else weight.device
            fresh = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)  # on the CPU
            child.weight = nn.Parameter(fresh.weight.to(device=device, dtype=weight.dtype))
            if child.bias is not None:
                child.bias = nn.Parameter(fresh.bias.to(device=device, dtype=weight.dtype))
            logger.warning("%s.%s had no usable weights after loading; initialised on the CPU", name, child_name)
