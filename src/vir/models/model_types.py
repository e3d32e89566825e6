"""What each model-directory key accepts, by the `model_type` the directory's config.json declares.

Read as plain JSON, before anything is instantiated: a Llama directory given as the vision tower, or a CLIP one
given as the LLM, stops with one line naming the key, the type found and the types supported, instead of
loading as the wrong kind of model (transformers fills a wrong config's missing fields with defaults).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from vir.utils.config import ConfigError

# `llava_llama`: a saved LLaVA model (ours, or LLaVA's own release) as the LLM, its tower and projector with it.
LLM_TYPES = ("llama", "llava_llama")
# A CLIP model or its vision half (CLIPVisionConfig reads either).
TOWER_TYPES = ("clip", "clip_vision_model")
# transformers' LlavaForConditionalGeneration (llava-hf/*), split into our bases by model.init_from_hf.
HF_LLAVA_TYPES = ("llava",)

MODEL_DIR_TYPES: Dict[str, Tuple[str, ...]] = {
    "model.llm.path": LLM_TYPES,
    "model.vision_tower.path": TOWER_TYPES,
    "model.init_from_hf": HF_LLAVA_TYPES,
}


def model_type_of(path: Any, key: str) -> str:
    """The `model_type` of the directory `path` (set as `key`); `ConfigError` when it has no readable
    config.json."""
    config_file = Path(str(path)) / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}={path} has no config.json: not a saved Hugging Face model directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{key}={path}: {config_file} is not a readable JSON object ({err})") from None
    return str(model_type)


def check_model_type(path: Any, key: str, supported: Optional[Tuple[str, ...]] = None) -> str:
    """`model_type_of(path, key)`, which must be one of `supported` (default: what `MODEL_DIR_TYPES` says `key`
    takes); returns it."""
    model_type = model_type_of(path, key)
    supported = supported or MODEL_DIR_TYPES[key]
    if model_type not in supported:
        raise ConfigError(f"{key}={path} holds a {model_type!r} model; {key} takes {' or '.join(supported)}")
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
