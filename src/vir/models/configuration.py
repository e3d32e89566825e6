"""`LlavaLlamaConfig`: a Llama config plus LLaVA's multimodal fields.

It is the single source of truth for shapes: `mm_hidden_size` and `num_image_tokens` are derived here from
the CLIP `vision_config` (which is serialised into `config.json`, so `from_pretrained` rebuilds the tower
without touching the original CLIP directory). Field names follow the original LLaVA so its users find
`mm_projector_type`, `mm_vision_select_layer`, ... where they expect them.
"""

from __future__ import annotations

import logging
import re

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

logger = logging.getLogger(__name__)

SELECT_FEATURES = ("patch", "cls_patch")
# `mlp{N}x_gelu` is LLaVA's family of N-layer GELU MLPs; `mlp2x_gelu` is LLaVA-1.5's projector.
PROJECTOR_TYPE_PATTERN = re.compile(r"^(linear|identity|mlp(\d+)x_gelu)$")
PROJECTOR_TYPES = ("linear", "mlp2x_gelu", "identity")

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


@strict
class LlavaLlamaConfig(LlamaConfig):
    """Llama config + CLIP vision config + projector settings (LLaVA-1.5 field names).

    Derived (recomputed on every construction, stored in config.json for readers):
        mm_hidden_size   = vision_config.hidden_size
        num_image_tokens = (image_size // patch_size) ** 2, + 1 when mm_vision_select_feature == 'cls_patch'
    `vision_config` accepts a `CLIPVisionConfig`, a full `CLIPConfig` (its vision part is used) or a dict of
    either; None gives CLIP ViT-L/14-336.
    """

    model_type = "llava_llama"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=DEFAULT_VISION_CONFIG)
    }

    vision_config: dict | PreTrainedConfig | None = None
    mm_vision_tower: str | None = None
    mm_hidden_size: int | None = None
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    tokenizer_model_max_length: int | None = None
    image_token: str = "<image>"  # the tag in conversations (model.image_token); `image_token_id` is its id
    image_token_id: int | None = None
    num_image_tokens: int | None = None
    mm_use_im_start_end: bool = False

    def __post_init__(self, **kwargs):
        self.vision_config = _vision_part(self.vision_config)
        super().__post_init__(**kwargs)
        check_projector_type(self.mm_projector_type)
        check_select_feature(self.mm_vision_select_feature)
        self._check_vision_fit()
        self._derive_shapes()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # Keep the derived shapes true when a field they depend on is changed after construction.
        if name in ("vision_config", "mm_vision_select_feature") and getattr(self, "_post_init_done", False):
            if name == "mm_vision_select_feature":
                check_select_feature(value)
            self._derive_shapes(warn=False)

    def _derive_shapes(self, warn: bool = True) -> None:
        vision = self.vision_config
        num_patches = (vision.image_size // vision.patch_size) ** 2
        derived = {
            "mm_hidden_size": vision.hidden_size,
            "num_image_tokens": num_patches + (1 if self.mm_vision_select_feature == "cls_patch" else 0),
        }
        for name, value in derived.items():
            stored = getattr(self, name)
            if warn and stored is not None and stored != value:
                logger.warning("%s=%s disagrees with the vision config; using the derived %s", name, stored, value)
            setattr(self, name, value)

    def _check_vision_fit(self) -> None:
        """Plain ValueErrors (not wrapped by `@strict`) when the tower cannot feed this LLM."""
        if self.mm_projector_type == "identity" and self.vision_config.hidden_size != self.hidden_size:
            raise ValueError(
                f"mm_projector_type='identity' needs the vision hidden size ({self.vision_config.hidden_size}) "
                f"to equal the LLM hidden size ({self.hidden_size}); use 'linear' or 'mlp2x_gelu'"
            )
        num_layers = self.vision_config.num_hidden_layers
        if not -(num_layers + 1) <= self.mm_vision_select_layer <= num_layers:
            raise ValueError(
                f"mm_vision_select_layer={self.mm_vision_select_layer} is out of range for a vision tower with "
                f"{num_layers} layers (hidden states -{num_layers + 1}..{num_layers})"
            )


def _vision_part(vision_config):
    """A full CLIP config (object or dict) -> its vision part; anything else unchanged."""
    if isinstance(vision_config, CLIPConfig):
        return vision_config.vision_config
    if isinstance(vision_config, dict) and vision_config.get("model_type") == "clip":
        return vision_config.get("vision_config") or {}
    return vision_config
