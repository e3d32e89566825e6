"""Decoder family -> the LLaVA config and model classes for it, built on first use.

A family is the `model_type` of its LLM config (`llama`, `qwen2`, `gemma2`, ...). `llava_classes("qwen2")` gives
(`LlavaQwen2Config`, `LlavaQwen2ForCausalLM`), made from transformers' own `Qwen2Config` and `Qwen2ForCausalLM`
and registered with the Auto classes under `llava_qwen2`, so a saved run loads with `AutoModelForCausalLM`.
"""

from __future__ import annotations

from typing import Any, Tuple

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from vir.models.configuration import LlavaConfigMixin, llava_config_class
from vir.models.llava_arch import llava_causal_lm_class
from vir.models.model_types import llm_family


def text_config_class(family: str) -> type:
    """transformers' config class of a decoder family (`qwen2` -> `Qwen2Config`)."""
    return CONFIG_MAPPING[family]


def llava_classes(family: str) -> Tuple[type, type]:
    """(LLaVA config class, LLaVA causal-LM class) for a decoder family, or for a saved LLaVA type of one
    (`llava_qwen2`); both registered with transformers' Auto classes."""
    config_class = text_config_class(llm_family(family))
    model_class = llava_causal_lm_class(MODEL_FOR_CAUSAL_LM_MAPPING[config_class])
    return llava_config_class(config_class), model_class


def llava_model_class(config: PreTrainedConfig) -> type:
    """The LLaVA causal-LM class for a LLaVA config (of any family)."""
    if not isinstance(config, LlavaConfigMixin):
        raise TypeError(f"{type(config).__name__} is not a LLaVA config")
    return llava_classes(config.text_model_type)[1]


def register_saved_type(model_type: Any) -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM` know a saved LLaVA model_type (`llava_qwen2`) before a
    directory of that type is read; plain families are known to transformers already."""
    model_type = str(model_type)
    family = llm_family(model_type)
    if family != model_type and family in CONFIG_MAPPING and model_type == f"llava_{family}":
        llava_classes(family)
