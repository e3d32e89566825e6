"""What each model-directory key accepts, by the `model_type` the directory's config.json declares.

`model.llm.path` takes any decoder-only causal LM transformers loads (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
...), or a saved LLaVA model of one; the tower takes CLIP or SigLIP; `model.init_from_hf` an llava-hf checkpoint.
Read as plain JSON, before anything is instantiated: a Llama directory given as the vision tower, or a CLIP one
given as the LLM, stops with one line naming the key, the type found and the types supported, instead of
loading as the wrong kind of model (transformers fills a wrong config's missing fields with defaults).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from vir.utils.config import ConfigError

LLAVA_PREFIX = "llava_"
# LLaVA-NeXT / OneVision name their Qwen2 models `llava_qwen`; every other saved LLaVA type is `llava_<family>`.
LLAVA_ALIASES = {"llava_qwen": "qwen2"}
# Families tested end to end (any other decoder AutoModelForCausalLM loads is accepted and runs the same code).
TESTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# A CLIP or SigLIP model or its vision half (the vision config classes read either). SigLIP 2's fixed-resolution
# checkpoints are `siglip` models.
TOWER_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
# transformers' LlavaForConditionalGeneration (llava-hf/*), split into our bases by model.init_from_hf.
HF_LLAVA_TYPES = ("llava",)
# Multimodal layouts users try in place of these, with what to do instead.
_OTHER_MULTIMODAL = {
    "llava": "an llava-hf LlavaForConditionalGeneration: import it with model.init_from_hf",
    "llava_next": "LLaVA-NeXT (anyres tiling), which this LLaVA-1.5 recipe does not train",
    "llava_onevision": "LLaVA-OneVision (anyres tiling), which this LLaVA-1.5 recipe does not train",
    "siglip2": "SigLIP 2 NaFlex (variable resolution); its fixed-resolution checkpoints (model_type siglip) work",
}
LLM_KEY = "model.llm.path"
MODEL_DIR_TYPES: Dict[str, Optional[Tuple[str, ...]]] = {
    LLM_KEY: None,  # any decoder family: `check_llm_type`
    "model.vision_tower.path": TOWER_TYPES,
    "model.init_from_hf": HF_LLAVA_TYPES,
}


def read_model_config(path: Any, key: str) -> Dict[str, Any]:
    """The config.json of the directory `path` (set as `key`) as a dict; `ConfigError` when it has no readable
    config.json."""
    config_file = Path(str(path)) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}={path} has no config.json: not a saved Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={path}: {config_file} is not a readable JSON object ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}={path}: {config_file} is not a JSON object")
    return raw


def model_type_of(path: Any, key: str) -> str:
    """The `model_type` of the directory `path` (set as `key`); `ConfigError` when it has no readable
    config.json."""
    return str(read_model_config(path, key).get("model_type"))


def llm_family(model_type: str) -> str:
    """The LLM family of an LLM directory's model_type: `qwen2` for `qwen2`, `llava_qwen2` and `llava_qwen`."""
    if model_type in LLAVA_ALIASES:
        return LLAVA_ALIASES[model_type]
    return model_type.removeprefix(LLAVA_PREFIX) if model_type.startswith(LLAVA_PREFIX) else model_type


def llm_type_problem(raw: Dict[str, Any]) -> Optional[str]:
    """Why a config.json (as a dict) is not a decoder LLM this recipe can put under a vision tower; None if it is.
    A saved LLaVA model of a decoder family (`llava_<family>`, LLaVA's own `llava_llama`/`llava_mistral`/
    `llava_qwen`) is one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = str(raw.get("model_type"))
    if model_type in _OTHER_MULTIMODAL:
        return _OTHER_MULTIMODAL[model_type]
    family = llm_family(model_type)
    saved_llava = family != model_type
    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "not a causal language model transformers knows"
    if raw.get("is_encoder_decoder"):
        return "an encoder-decoder model"
    if not saved_llava and any(key in raw for key in ("vision_config", "text_config", "audio_config")):
        return "a multimodal model"
    tiling = str(raw.get("image_aspect_ratio") or "")
    if saved_llava and (tiling.startswith("anyres") or str(raw.get("mm_patch_merge_type") or "").startswith("spatial")):
        return (f"a LLaVA-NeXT / OneVision checkpoint (image_aspect_ratio={tiling or None}, anyres tiling), which "
                "this LLaVA-1.5 recipe does not train")
    return None


def check_llm_type(path: Any, key: str = LLM_KEY) -> str:
    """The `model_type` of the LLM directory `path` (set as `key`; `llm_family` of it is its family); `ConfigError`
    naming the key, the type found and what is supported when it is not a decoder LLM (`llm_type_problem`)."""
    raw = read_model_config(path, key)
    problem = llm_type_problem(raw)
    if problem is not None:
        raise ConfigError(
            f"{key}={path} holds a {raw.get('model_type')!r} model ({problem}); {key} takes a decoder-only causal "
            f"LM that AutoModelForCausalLM loads (tested: {', '.join(TESTED_FAMILIES)}) or a saved LLaVA model of "
            "one (llava_<family>)")
    return str(raw["model_type"])


def check_model_type(path: Any, key: str, supported: Optional[Tuple[str, ...]] = None) -> str:
    """`model_type_of(path, key)`, which must be one of `supported` (default: what `MODEL_DIR_TYPES` says `key`
    takes; for `model.llm.path`, `check_llm_type`'s rule); returns it."""
    supported = supported or MODEL_DIR_TYPES.get(key)
    if supported is None:
        return check_llm_type(path, key)
    model_type = model_type_of(path, key)
    if model_type not in supported:
        hint = f" ({_OTHER_MULTIMODAL[model_type]})" if model_type in _OTHER_MULTIMODAL else ""
        raise ConfigError(f"{key}={path} holds a {model_type!r} model{hint}; {key} takes {' or '.join(supported)}")
    return model_type


# Full weights as transformers saves them (one file, or shards with an index); an adapter alone is not a model.
WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin")


def check_model_dir(path: Any, key: str) -> str:
    """`check_model_type`, and the directory holds full weights (`WEIGHT_PATTERNS`); returns the model_type."""
    model_type = check_model_type(path, key)
    directory = Path(str(path))
    if not any(next(directory.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        hint = (": it holds a LoRA adapter; fold it into its base with `vir-merge RUN OUT` and point the key at OUT"
                if (directory / "adapter_config.json").is_file() else "")
        raise ConfigError(f"{key}={path} holds no model weights ({' or '.join(WEIGHT_PATTERNS)}){hint}")
    return model_type
