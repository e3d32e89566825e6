"""LLaVA-1.5 model room: configs, vision towers, projector, the per-family LLaVA models and the builders.

The LLaVA classes of a decoder family are made and registered with transformers' Auto classes on first use
(`vir.models.families.llava_classes`); `llava_llama` is registered on import, so
`AutoModelForCausalLM.from_pretrained(saved_dir)` works without `trust_remote_code`.
"""

from vir.models.builder import build_all, build_image_processor, build_model, build_tokenizer
from vir.models.configuration import LlavaLlamaConfig
from vir.models.families import llava_classes, llava_model_class
from vir.models.model_config import build_model_config
from vir.models.llava_arch import LlavaLlamaForCausalLM, splice_image_features

__all__ = [
    "LlavaLlamaConfig",
    "LlavaLlamaForCausalLM",
    "build_all",
    "build_image_processor",
    "build_model",
    "build_model_config",
    "build_tokenizer",
    "llava_classes",
    "llava_model_class",
    "splice_image_features",
]
