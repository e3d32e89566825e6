"""LLaVA-1.5 model room: config, CLIP tower, projector, Llama-based model and the builders.

Importing this package registers `llava_llama` with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(saved_dir)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from vir.models.builder import build_all, build_image_processor, build_model, build_model_config, build_tokenizer
from vir.models.configuration import LlavaLlamaConfig
from vir.models.llava_arch import LlavaLlamaForCausalLM, LlavaLlamaModel, splice_image_features

AutoConfig.register(LlavaLlamaConfig.model_type, LlavaLlamaConfig, exist_ok=True)
AutoModel.register(LlavaLlamaConfig, LlavaLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LlavaLlamaConfig, LlavaLlamaForCausalLM, exist_ok=True)

__all__ = [
    "LlavaLlamaConfig",
    "LlavaLlamaForCausalLM",
    "build_all",
    "build_image_processor",
    "build_model",
    "build_model_config",
    "build_tokenizer",
    "splice_image_features",
]
