"""Config section -> the LLaVA config of the LLM's family: every shape a model of `model.*` has, without weights.

The LLM's shape comes from `model.llm.path`'s config.json (any decoder family, or a saved LLaVA model of one), else
from the size keys of `model.llm` (`model.llm.model_type` picks the family); the tower's from
`model.vision_tower.path`, else its size keys (`model.vision_tower.model_type`: CLIP or SigLIP); token ids from
the prepared tokenizer. `vir.models.builder` loads the weights into it; the planner and `vir-validate` need only
this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from transformers import AutoConfig, PreTrainedConfig, PreTrainedTokenizerBase

from vir.models.configuration import check_projector_type, check_select_feature, is_llava_config
from vir.models.encoder import load_vision_config, vision_classes
from vir.models.families import llava_classes, register_saved_type, text_config_class
from vir.models.model_types import check_llm_type, llm_family, llm_type_problem
from vir.utils.config import ConfigError

# Keys copied from an LLM's config.json that must not leak into the LLaVA config built from it.
_NOT_TEXT_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype")



def build_model_config(
    model_cfg: Any, tokenizer: PreTrainedTokenizerBase, image_aspect_ratio: str = "pad"
) -> PreTrainedConfig:
    """The LLaVA config of the LLM's family for `model_cfg`: LLM shape from `model.llm.path`'s config.json (else
    the size fields and `model.llm.model_type`), vision shape from `model.vision_tower.path` (else the size
    fields), token ids from `tokenizer`."""
    try:
        check_projector_type(model_cfg.projector_type, key="model.projector_type")
        check_select_feature(model_cfg.vision_tower.select_feature, key="model.vision_tower.select_feature")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    image_token_id = tokenizer.convert_tokens_to_ids(model_cfg.image_token)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ConfigError(f"the tokenizer has no {model_cfg.image_token!r} token (model.image_token); "
                         "run it through prepare_tokenizer (build_tokenizer does)")
    source = read_llm_config(model_cfg.llm.path) if model_cfg.llm.path else None
    if source is not None and is_llava_config(source) and not model_cfg.vision_tower.path \
            and not _has_vision_config(model_cfg.llm.path):
        raise ConfigError(
            f"model.llm.path={model_cfg.llm.path} is an original LLaVA checkpoint: its tower is named "
            f"{getattr(source, 'mm_vision_tower', None)!r} (mm_vision_tower), not stored with it; set "
            "model.vision_tower.path to a local copy of that CLIP or SigLIP model")
    if source is not None:
        family, text_fields = _family_of(source), _text_fields(source)
    else:
        family, text_fields = random_init_family(model_cfg.llm), llm_fields_from_sizes(model_cfg.llm)
    vocab_size = len(tokenizer) if source is None else max(len(tokenizer), source.vocab_size)
    if source is None and getattr(model_cfg.llm, "vocab_size", None):
        vocab_size = max(vocab_size, model_cfg.llm.vocab_size)
    multimodal_fields = {
        "vocab_size": vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "image_token": model_cfg.image_token,
        "image_token_id": image_token_id,
        "vision_config": vision_config(model_cfg.vision_tower, source),
        "mm_vision_tower": model_cfg.vision_tower.path,
        "mm_projector_type": model_cfg.projector_type,
        "mm_vision_select_layer": model_cfg.vision_tower.select_layer,
        "mm_vision_select_feature": model_cfg.vision_tower.select_feature,
        "image_aspect_ratio": image_aspect_ratio,
        "tokenizer_model_max_length": model_cfg.model_max_length,
    }
    config_class = llava_classes(family)[0]
    try:
        return config_class(**{**text_fields, **multimodal_fields})
    except ValueError as err:  # the shapes and options the user chose do not fit together
        raise ConfigError(str(err)) from None


def require_dir(path: Any, key: str) -> Path:
    directory = Path(str(path))
    if not directory.is_dir():
        raise FileNotFoundError(f"{key}={path} is not a directory; point it at a local Hugging Face directory")
    return directory


def read_llm_config(path: Any) -> PreTrainedConfig:
    """The config of the LLM directory `path`: the family's config, or a saved LLaVA model's (its family's LLaVA
    config class registered first)."""
    directory = require_dir(path, "model.llm.path")
    model_type = check_llm_type(directory)  # and a config.json to read it from
    family = llm_family(model_type)
    register_saved_type(model_type)
    if model_type != family and model_type != f"llava_{family}":  # LLaVA-NeXT's `llava_qwen`: Qwen2 by another name
        return llava_classes(family)[0].from_pretrained(str(directory))
    return AutoConfig.from_pretrained(str(directory))


def _family_of(source: PreTrainedConfig) -> str:
    return source.text_model_type if is_llava_config(source) else source.model_type


def random_init_family(llm_cfg: Any) -> str:
    """`model.llm.model_type`: the decoder family a random-init LLM is built as."""
    family = str(getattr(llm_cfg, "model_type", None) or "llama")
    problem = llm_type_problem({"model_type": family})
    if problem is not None:
        raise ConfigError(f"model.llm.model_type={family} is {problem}; it names the decoder family of a random-init "
                          "LLM (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, ...)")
    return family


def _has_vision_config(path: Any) -> bool:
    """Whether a LLaVA directory's config.json carries its tower's shape (ours do; LLaVA's own releases don't)."""
    return "vision_config" in json.loads((Path(str(path)) / "config.json").read_text())


def _text_fields(source: PreTrainedConfig) -> dict:
    """The LLM fields of an LLM config.json (a saved LLaVA config's multimodal fields are rebuilt)."""
    fields = source.to_dict()
    for key in _NOT_TEXT_FIELDS + ("mm_hidden_size", "num_image_tokens"):
        fields.pop(key, None)
    return fields


def llm_fields_from_sizes(llm_cfg: Any) -> dict:
    """Config fields for a random-init LLM of the family `model.llm.model_type` from the size keys of `model.llm`
    (`head_dim` defaults to hidden_size / heads; `tie_word_embeddings` null keeps the family's default;
    `extra_config` adds any other field of the family's config)."""
    family = random_init_family(llm_cfg)
    fields = {
        "hidden_size": llm_cfg.hidden_size,
        "intermediate_size": llm_cfg.intermediate_size,
        "num_hidden_layers": llm_cfg.num_hidden_layers,
        "num_attention_heads": llm_cfg.num_attention_heads,
        "num_key_value_heads": llm_cfg.num_key_value_heads,
        "max_position_embeddings": llm_cfg.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(llm_cfg.rope_theta)},
    }
    known = getattr(text_config_class(family), "__dataclass_fields__", {})
    if "head_dim" in known:
        fields["head_dim"] = getattr(llm_cfg, "head_dim", None) or llm_cfg.hidden_size // llm_cfg.num_attention_heads
    if getattr(llm_cfg, "tie_word_embeddings", None) is not None:
        fields["tie_word_embeddings"] = bool(llm_cfg.tie_word_embeddings)
    fields = {key: value for key, value in fields.items() if key in known}
    extra = dict(getattr(llm_cfg, "extra_config", None) or {})
    unknown = sorted(set(extra) - set(known))
    if unknown:
        raise ConfigError(f"model.llm.extra_config sets {', '.join(unknown)}, which a {family} config does not have")
    return {**fields, **extra}


def vision_config(tower_cfg: Any, source: Optional[PreTrainedConfig] = None) -> PreTrainedConfig:
    """The tower's shape: `model.vision_tower.path`'s config, else a saved LLaVA LLM's own tower (`source`),
    else the size fields."""
    if tower_cfg.path:
        return load_vision_config(tower_cfg.path)
    if source is not None and is_llava_config(source):  # a saved LLaVA model carries its own tower's shape
        return source.vision_config
    return vision_config_from_sizes(tower_cfg)


def vision_config_from_sizes(tower_cfg: Any) -> PreTrainedConfig:
    """A random-init tower's vision config (`model.vision_tower.model_type`: CLIP or SigLIP) from its size keys."""
    tower_type = str(getattr(tower_cfg, "model_type", None) or "clip_vision_model")
    try:
        config_class = vision_classes(tower_type)[0]
    except KeyError:
        raise ConfigError(f"model.vision_tower.model_type={tower_type} is not a vision tower; choose "
                          "clip_vision_model or siglip_vision_model") from None
    return config_class(
        image_size=tower_cfg.image_size,
        patch_size=tower_cfg.patch_size,
        hidden_size=tower_cfg.hidden_size,
        intermediate_size=tower_cfg.intermediate_size,
        num_hidden_layers=tower_cfg.num_hidden_layers,
        num_attention_heads=tower_cfg.num_attention_heads,
    )
