"""Config section -> model, tokenizer, image processor. The one place that loads weights from disk.

The LLM may be any decoder family (`vir.models.families`); the vision tower CLIP or SigLIP. The model's config, and
so every shape, comes from `vir.models.model_config.build_model_config`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from transformers import AutoTokenizer, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from vir.data.images import processor_image_size as processed_size
from vir.data.templates import FINETUNE_PAD
from vir.models.configuration import is_llava_config
from vir.models.encoder import load_vision_config, quiet_load_report
from vir.models.families import llava_classes
from vir.models.image_processors import ImageProcessor, default_image_processor, load_image_processor
from vir.models.model_config import build_model_config, read_llm_config, require_dir
from vir.models.projector import load_projector_state_dict
from vir.models.quantization import ensure_initialised, quantized_loading
from vir.utils.config import ConfigError
from vir.utils.config_schema import DTYPE_NAMES

logger = logging.getLogger(__name__)

FALLBACK_PAD = "<pad>"
# A directory holds a tokenizer when it has one of these (fast, sentencepiece, or a config naming the class).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    image_token: str = "<image>",
    pad_token: Optional[str] = None,
    model_max_length: Optional[int] = None,
) -> PreTrainedTokenizerBase:
    """Make an LLM's tokenizer ready for multimodal training, in place.

    Adds `image_token` as a special token when missing; sets a pad token when there is none (`pad_token`,
    else Llama-3's `<|finetune_right_pad_id|>` when the vocabulary has it, else a new `<pad>`), so padding
    never silently reuses id 0 or the eos id; pads on the right. The caller must resize the model's
    embeddings to `len(tokenizer)` afterwards (`build_model` does).
    """
    vocab = tokenizer.get_vocab()
    if image_token not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if pad_token is not None:
        if pad_token not in vocab:
            tokenizer.add_special_tokens({"pad_token": pad_token})
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        if FINETUNE_PAD in vocab:
            tokenizer.pad_token = FINETUNE_PAD
        else:
            tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD})
    tokenizer.padding_side = "right"
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
def build_tokenizer(model_cfg: Any) -> PreTrainedTokenizerBase:
    """AutoTokenizer from `model.tokenizer_path` (else `model.llm.path`), prepared with `prepare_tokenizer`."""
    if model_cfg.tokenizer_path:
        key, path = "model.tokenizer_path", model_cfg.tokenizer_path
    elif model_cfg.llm.path:
        key, path = "model.llm.path", model_cfg.llm.path
    else:
        raise ConfigError("no tokenizer configured: set model.tokenizer_path (or model.llm.path) to a local HF "
                          "tokenizer directory")
    require_dir(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:  # no tokenizer files, or ones transformers cannot build
        raise ConfigError(f"{key}={path}: no tokenizer loads from it ({str(err).splitlines()[0][:200]}); set "
                          "model.tokenizer_path to the LLM's tokenizer directory") from None
    return prepare_tokenizer(tokenizer, model_cfg.image_token, model_cfg.pad_token, model_cfg.model_max_length)


def build_image_processor(model_cfg: Any) -> ImageProcessor:
    """The tower's image processor (PIL backend): the one saved with the tower at `model.vision_tower.path`, else
    its family's defaults at the tower's image size (CLIP: OpenAI mean/std, resize + centre crop; SigLIP: mean and
    std 0.5, resize to a square)."""
    tower_cfg = model_cfg.vision_tower
    if tower_cfg.path:
        directory = require_dir(tower_cfg.path, "model.vision_tower.path")
        vision = load_vision_config(directory)
        if (directory / "preprocessor_config.json").is_file():
            return load_image_processor(directory, "model.vision_tower.path")
        logger.warning("%s has no preprocessor_config.json; using %s's defaults at %d px", directory,
                       vision.model_type, vision.image_size)
        return default_image_processor(vision.model_type, vision.image_size)
    return default_image_processor(tower_cfg.model_type, tower_cfg.image_size)


def build_model(
    model_cfg: Any, tokenizer: PreTrainedTokenizerBase, image_aspect_ratio: str = "pad"
) -> PreTrainedModel:
    """The LLaVA model of the LLM's family for `model_cfg`: random init when `model.llm.path` is null, else the
    LLM's weights from there; tower weights from `model.vision_tower.path`; `model.pretrained_projector` when set.

    Embeddings end up with `len(tokenizer)` rows (new rows are the mean of the old ones, as in LLaVA; tied
    embeddings stay tied); the vision tower is frozen when `model.vision_tower.freeze`. `model.llm.path` may also
    be a saved LLaVA model: its tower and projector load with it, and `model.vision_tower.path`, when set, still
    overwrites the tower (explicit config wins).
    """
    config = build_model_config(model_cfg, tokenizer, image_aspect_ratio)
    model_class = llava_classes(config.text_model_type)[1]
    dtype = _dtype(model_cfg.llm.dtype)
    attn = attention_implementation(model_class, model_cfg.llm.attn_implementation)
    placement = quantized_loading(model_cfg.llm, dtype)
    if model_cfg.llm.path is None:
        if placement:
            raise ConfigError(f"model.llm.quantization={model_cfg.llm.quantization} quantizes a checkpoint as it "
                             "loads: set model.llm.path to a local LLM directory")
        model = model_class._from_config(config, dtype=dtype, attn_implementation=attn)
    else:
        # Load with the checkpoint's vocabulary size, then grow it for the tokens the tokenizer added.
        source = read_llm_config(model_cfg.llm.path)
        load_config = copy.deepcopy(config)
        load_config.vocab_size = source.vocab_size
        if load_config.pad_token_id is not None and load_config.pad_token_id >= source.vocab_size:
            load_config.pad_token_id = getattr(source, "pad_token_id", None)  # a pad token the tokenizer added
        model = _load_llm(model_class, model_cfg.llm.path, load_config, is_llava_config(source),
                          bool(model_cfg.vision_tower.path), dtype=dtype, attn_implementation=attn, **placement)
        resize_token_embeddings_mean_init(model, config.vocab_size)
        model.config.pad_token_id = config.pad_token_id
        if placement:
            ensure_initialised(model.get_model().mm_projector, "model.mm_projector")
    if model_cfg.vision_tower.path:
        model.get_vision_tower().load_pretrained_weights(model_cfg.vision_tower.path)
    if model_cfg.pretrained_projector:
        if not Path(model_cfg.pretrained_projector).exists():
            raise FileNotFoundError(f"model.pretrained_projector={model_cfg.pretrained_projector} does not exist")
        load_projector_state_dict(model, model_cfg.pretrained_projector)
    if model_cfg.vision_tower.freeze:
        model.get_vision_tower().requires_grad_(False)
    return model


def _load_llm(model_class: type, path: Any, config: PreTrainedConfig, source_is_llava: bool, tower_from_path: bool,
              **kwargs: Any) -> PreTrainedModel:
    """`from_pretrained` without transformers' table of the tower/projector keys a plain LLM directory lacks
    (expected, unless `source_is_llava`), nor of the tower keys a LLaVA checkpoint lacks when the tower comes from
    `model.vision_tower.path` (`tower_from_path`; LLaVA's releases leave it out); any other missing key is still
    reported, by name."""
    with quiet_load_report():
        model, info = model_class.from_pretrained(
            str(path), config=config, low_cpu_mem_usage=True, output_loading_info=True, **kwargs
        )
    # Absent from a plain LLM checkpoint by design: they come from `model.vision_tower.path` and the projector.
    prefix = model_class.base_model_prefix
    multimodal = (f"{prefix}.vision_tower.", f"{prefix}.mm_projector.")
    expected_absent = multimodal if not source_is_llava else (multimodal[:1] if tower_from_path else ())
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(expected_absent))
    if missing:
        logger.warning("model.llm.path=%s lacks %d weights (randomly initialised): %s", path, len(missing),
                       ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    if info["unexpected_keys"]:
        logger.warning("model.llm.path=%s has %d weights the model does not use: %s", path,
                       len(info["unexpected_keys"]), ", ".join(sorted(info["unexpected_keys"])[:8]))
    return model


def build_inputs(cfg: Any) -> Tuple[PreTrainedTokenizerBase, ImageProcessor, PreTrainedConfig]:
    """(tokenizer, image_processor, model config) for a composed config, without loading any weights: what the
    data pipeline needs, so data errors surface before a model is loaded."""
    tokenizer = build_tokenizer(cfg.model)
    config = build_model_config(cfg.model, tokenizer, cfg.data.image_aspect_ratio)
    image_processor = build_image_processor(cfg.model)
    width, height = processed_size(image_processor)
    tower_size = config.vision_config.image_size
    if (width, height) != (tower_size, tower_size):
        raise ConfigError(f"the image processor makes {width}x{height} images but the vision tower expects "
                         f"{tower_size}x{tower_size} (model.vision_tower.image_size / .path)")
    return tokenizer, image_processor, config


def build_all(cfg: Any) -> Tuple[PreTrainedModel, PreTrainedTokenizerBase, ImageProcessor]:
    """(model, tokenizer, image_processor) for a composed config (`cfg.model`, `cfg.data.image_aspect_ratio`)."""
    tokenizer, image_processor, _ = build_inputs(cfg)
    return build_model(cfg.model, tokenizer, image_aspect_ratio=cfg.data.image_aspect_ratio), tokenizer, image_processor


def resize_token_embeddings_mean_init(model: PreTrainedModel, num_tokens: int) -> None:
    """Grow input and output embeddings to `num_tokens` rows, each new row the mean of the old rows.

    The mean keeps the new tokens' logits and embeddings in the distribution the model already knows (LLaVA
    does the same); never shrinks, so checkpoints whose vocabulary is padded past the tokenizer keep it. Tied
    embeddings are one weight, grown once.
    """
    old_tokens = model.get_input_embeddings().weight.shape[0]
    if num_tokens <= old_tokens:
        return
    model.resize_token_embeddings(num_tokens, mean_resizing=False)
    weights = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())}
    with torch.no_grad():
        for weight in weights.values():
            weight[old_tokens:] = weight[:old_tokens].float().mean(dim=0).to(weight.dtype)
    logger.info("resized token embeddings %d -> %d (mean-initialised)", old_tokens, num_tokens)


def attention_implementation(model_class: type, requested: Optional[str]) -> Optional[str]:
    """`model.llm.attn_implementation`, or eager where the family has no SDPA path (Gemma 2's softcapped
    attention) and SDPA, the default, was asked for."""
    if requested == "sdpa" and not getattr(model_class, "_supports_sdpa", True):
        logger.warning("%s has no SDPA attention; using eager (model.llm.attn_implementation)", model_class.__name__)
        return "eager"
    return requested


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} (model.llm.dtype); choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
