"""LLaVA configs for any decoder family: the family's own config class plus LLaVA's multimodal fields.

`llava_config_class(Qwen2Config)` is `LlavaQwen2Config` (model_type `llava_qwen2`): every field of the LLM's
config.json keeps its name and meaning, and the multimodal fields sit beside them under the original LLaVA's names
(`mm_projector_type`, `mm_vision_select_layer`, ...), which is how LLaVA's own releases store them. The class is
built once per family (`LlavaLlamaConfig` is the one for Llama, model_type `llava_llama` as in LLaVA).

It is the single source of truth for shapes: `mm_hidden_size` and `num_image_tokens` are derived from the vision
tower's `vision_config` (CLIP or SigLIP, serialised into config.json, so `from_pretrained` rebuilds the tower
without the tower's own directory).
"""

from __future__ import annotations

import functools
import logging
import re

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, LlamaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

logger = logging.getLogger(__name__)

SELECT_FEATURES = ("patch", "cls_patch")
# `mlp{N}x_gelu` is LLaVA's family of N-layer GELU MLPs; `mlp2x_gelu` is LLaVA-1.5's projector.
PROJECTOR_TYPE_PATTERN = re.compile(r"^(linear|identity|mlp(\d+)x_gelu)$")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "identity")

# Vision towers by the model_type of their vision config, and whether their sequence starts with a CLS token.
# (SigLIP 2's fixed-resolution checkpoints are `siglip` models; its NaFlex variant is not a square-grid tower.)
VISION_TYPES_WITH_CLS = {"clip_vision_model": True, "siglip_vision_model": False}
# Full (image + text) configs whose `vision_config` part is the tower.
VISION_PARENT_TYPES = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}

# CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower: the vision config used when none is given.
DEFAULT_VISION_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}


def check_projector_type(projector_type: str, key: str = "mm_projector_type") -> None:
    """Raise a ValueError naming `key` when `projector_type` is not one LLaVA knows."""
    match = PROJECTOR_TYPE_PATTERN.match(str(projector_type))
    if match is None or (match.group(2) is not None and int(match.group(2)) < 1):
        raise ValueError(
            f"unknown projector type {projector_type!r} ({key}); choose one of {', '.join(PROJECTOR_TYPES)} "
            "(or mlp<N>x_gelu for an N-layer MLP)"
        )


def check_select_feature(select_feature: str, key: str = "mm_vision_select_feature") -> None:
    """Raise a ValueError naming `key` when `select_feature` is neither 'patch' nor 'cls_patch'."""
    if select_feature not in SELECT_FEATURES:
        raise ValueError(
            f"unknown vision select feature {select_feature!r} ({key}); choose one of {', '.join(SELECT_FEATURES)}"
        )


def has_cls_token(vision_config: PreTrainedConfig) -> bool:
    """Whether the tower's output starts with a CLS token (CLIP) or holds only patch tokens (SigLIP)."""
    return VISION_TYPES_WITH_CLS[vision_config.model_type]


def num_image_tokens_of(vision_config: PreTrainedConfig, select_feature: str = "patch") -> int:
    """Tokens per image: one per patch of the square grid, plus CLIP's CLS token with 'cls_patch'."""
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return num_patches + (1 if select_feature == "cls_patch" and has_cls_token(vision_config) else 0)


class LlavaConfigMixin:
    """The multimodal half of every LLaVA config class (placed before the family's config in the MRO).

    Derived (recomputed on every construction, stored in config.json for readers):
        mm_hidden_size   = vision_config.hidden_size
        num_image_tokens = (image_size // patch_size) ** 2, + 1 for CLIP's CLS with mm_vision_select_feature
                           'cls_patch'
    `vision_config` accepts a CLIP or SigLIP vision config, a full CLIP/SigLIP config (its vision part is used) or
    a dict of either; None gives CLIP ViT-L/14-336.
    """

    def __post_init__(self, **kwargs):
        # LLaVA's own config.json has no vision_config (only `mm_vision_tower`, a name): the default stands in until
        # the tower's own config replaces it, so stored widths that disagree with the default are no news.
        given = self.vision_config is not None
        self.vision_config = _vision_part(self.vision_config)
        super().__post_init__(**kwargs)
        check_projector_type(self.mm_projector_type)
        check_select_feature(self.mm_vision_select_feature)
        self._check_vision_fit()
        self._derive_shapes(warn=given)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # Keep the derived shapes true when a field they depend on is changed after construction.
        if name in ("vision_config", "mm_vision_select_feature") and getattr(self, "_post_init_done", False):
            if name == "mm_vision_select_feature":
                check_select_feature(value)
            self._derive_shapes(warn=False)

    @property
    def text_model_type(self) -> str:
        """The family's own model_type (`qwen2` for `llava_qwen2`)."""
        return self.text_config_class.model_type

    def _derive_shapes(self, warn: bool = True) -> None:
        derived = {
            "mm_hidden_size": self.vision_config.hidden_size,
            "num_image_tokens": num_image_tokens_of(self.vision_config, self.mm_vision_select_feature),
        }
        for name, value in derived.items():
            stored = getattr(self, name)
            if warn and stored is not None and stored != value:
                logger.warning("%s=%s disagrees with the vision config; using the derived %s", name, stored, value)
            setattr(self, name, value)

    def _check_vision_fit(self) -> None:
        """Plain ValueErrors (not wrapped by `@strict`) when the tower cannot feed this LLM."""
        vision = self.vision_config
        if vision.model_type not in VISION_TYPES_WITH_CLS:
            raise ValueError(f"vision_config is a {vision.model_type!r} config; the vision tower must be one of "
                             f"{', '.join(VISION_TYPES_WITH_CLS)}")
        if self.mm_vision_select_feature == "cls_patch" and not has_cls_token(vision):
            raise ValueError(f"mm_vision_select_feature='cls_patch' keeps the CLS token, which a {vision.model_type} "
                             "tower does not have; use 'patch' (every patch token)")
        if self.mm_projector_type == "identity" and vision.hidden_size != self.hidden_size:
            raise ValueError(
                f"mm_projector_type='identity' needs the vision hidden size ({vision.hidden_size}) "
                f"to equal the LLM hidden size ({self.hidden_size}); use 'linear' or 'mlp2x_gelu'"
            )
        num_layers = vision.num_hidden_layers
        if not -(num_layers + 1) <= self.mm_vision_select_layer <= num_layers:
            raise ValueError(
                f"mm_vision_select_layer={self.mm_vision_select_layer} is out of range for a vision tower with "
                f"{num_layers} layers (hidden states -{num_layers + 1}..{num_layers})"
            )


# The multimodal fields: (type, default). Same names as the original LLaVA's config.json.
_MULTIMODAL_FIELDS = {
    "vision_config": (dict | PreTrainedConfig | None, None),
    "mm_vision_tower": (str | None, None),
    "mm_hidden_size": (int | None, None),
    "mm_projector_type": (str, "mlp2x_gelu"),
    "mm_vision_select_layer": (int, -2),
    "mm_vision_select_feature": (str, "patch"),
    "image_aspect_ratio": (str, "pad"),
    "tokenizer_model_max_length": (int | None, None),
    "image_token": (str, "<image>"),  # the tag in conversations (model.image_token); `image_token_id` is its id
    "image_token_id": (int | None, None),
    "num_image_tokens": (int | None, None),
    "mm_use_im_start_end": (bool, False),
}


def llava_model_type(text_model_type: str) -> str:
    """`llava_<family>`: the model_type a LLaVA model on that LLM family saves (`llava_llama` for Llama)."""
    return f"llava_{text_model_type}"


@functools.cache
def llava_config_class(text_config_class: type) -> type:
    """The LLaVA config class for an LLM config class (`LlamaConfig` -> `LlavaLlamaConfig`), built once and
    registered with `AutoConfig` under `llava_<model_type>`."""
    name = "Llava" + text_config_class.__name__
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"{text_config_class.__name__} + CLIP/SigLIP vision config + projector settings (LLaVA's "
                   "field names). " + (LlavaConfigMixin.__doc__ or ""),
        "__annotations__": {key: annotation for key, (annotation, _) in _MULTIMODAL_FIELDS.items()},
        **{key: default for key, (_, default) in _MULTIMODAL_FIELDS.items()},
        "model_type": llava_model_type(text_config_class.model_type),
        "text_config_class": text_config_class,
        "sub_configs_defaults": {
            **(getattr(text_config_class, "sub_configs_defaults", None) or {}),
            "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model",
                                           init_kwargs=DEFAULT_VISION_CONFIG),
        },
    }
    config_class = strict(type(name, (LlavaConfigMixin, text_config_class), namespace))
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    return config_class


LlavaLlamaConfig = llava_config_class(LlamaConfig)


def is_llava_config(config: PreTrainedConfig) -> bool:
    return isinstance(config, LlavaConfigMixin)


def _vision_part(vision_config):
    """A full CLIP/SigLIP config (object or dict) -> its vision part; anything else unchanged."""
    if isinstance(vision_config, PreTrainedConfig) and vision_config.model_type in VISION_PARENT_TYPES:
        return vision_config.vision_config
    if isinstance(vision_config, dict) and vision_config.get("model_type") in VISION_PARENT_TYPES:
        part = dict(vision_config.get("vision_config") or {})
        part.setdefault("model_type", VISION_PARENT_TYPES[vision_config["model_type"]])
        return part
    return vision_config
