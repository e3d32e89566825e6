"""`VisionTower`: transformers' `CLIPVisionModel` or `SiglipVisionModel` plus LLaVA's feature selection.

The wrapped model lives at `.vision_tower`, so inside the full model its weights are saved under
`model.vision_tower.vision_tower.*`, the layout LLaVA uses. Which model it wraps follows the `model_type` of the
vision config (`clip_vision_model`, `siglip_vision_model`); CLIP's CLS token is dropped with 'patch', SigLIP has
none (every token is a patch token).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vir.models.configuration import VISION_PARENT_TYPES, check_select_feature, has_cls_token
from vir.models.model_types import TOWER_TYPES, check_model_type
from vir.utils.errors import UserError
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)



# Vision config model_type -> (config class, model class).
VISION_CLASSES = {
    "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
    "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel),
}


def vision_classes(model_type: str) -> tuple:
    """(config class, model class) for a tower directory's or a vision config's model_type."""
    return VISION_CLASSES[VISION_PARENT_TYPES.get(model_type, model_type)]


def load_vision_config(path: PathLike, key: str = "model.vision_tower.path") -> PreTrainedConfig:
    """Read the vision config from a local CLIP/SigLIP directory, full or vision-only (`key` names it in errors)."""
    model_type = check_model_type(_checked_dir(path, key), key, TOWER_TYPES)
    # Reads either layout: a vision config, or a full CLIP/SigLIP config whose `vision_config` part is taken.
    return vision_classes(model_type)[0].from_pretrained(str(path))


def _checked_dir(path: PathLike, key: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{key}={path} is not a directory; point it at a local HF CLIP or SigLIP model "
                                "directory")
    return directory


class VisionTower(nn.Module):
    """CLIP or SigLIP image encoder returning one feature vector per image token.

    forward(pixel_values [N, 3, H, W]) -> [N, num_image_tokens, mm_hidden_size], taken from
    `hidden_states[select_layer]`; with CLIP 'patch' drops the CLS token, 'cls_patch' keeps it; SigLIP has no CLS
    token, so every token is kept. All N images go through
    the tower in one call. When every parameter is frozen (requires_grad False) the tower runs under
    `torch.no_grad()`, so no activations are kept for a backward pass that will never reach it.
    """

    def __init__(self, vision_config: PreTrainedConfig, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        check_select_feature(select_feature)
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.drops_cls = select_feature == "patch" and has_cls_token(vision_config)
        self.vision_tower = vision_classes(vision_config.model_type)[1]._from_config(vision_config)
        # Read by the parent's post_init, so device maps never split a CLIP layer across devices.
        self._no_split_modules = set(self.vision_tower._no_split_modules)

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> "VisionTower":
        """A random-init tower shaped and configured by `config` (weights come from a checkpoint later)."""
        return cls(config.vision_config, config.mm_vision_select_layer, config.mm_vision_select_feature)

    @classmethod
    def from_pretrained(
        cls, path: PathLike, select_layer: int = -2, select_feature: str = "patch", **kwargs
    ) -> "VisionTower":
        """A tower loaded from a local CLIP/SigLIP directory (full or vision-only); `kwargs` go to
        `from_pretrained` (dtype)."""
        with torch.device("meta"):  # shapes only: the loaded model replaces the random one
            tower = cls(load_vision_config(path), select_layer, select_feature)
        tower.vision_tower = _load_clip_vision(path, **kwargs)
        return tower

    def load_pretrained_weights(self, path: PathLike, key: str = "model.vision_tower.path") -> None:
        """Copy the weights of a local CLIP/SigLIP directory into this tower (shapes must match)."""
        loaded = _load_clip_vision(path, key=key, dtype=self.dtype)
        if type(loaded) is not type(self.vision_tower):
            raise UserError(f"{key}={path} holds a {loaded.config.model_type} tower but the model was configured "
                            f"with a {self.config.model_type} one")
        result = self.vision_tower.load_state_dict(loaded.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(
                f"{key}={path} does not match the configured vision tower: "
                f"missing {sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)}"
            )
        logger.info("loaded %s vision tower weights from %s", self.config.model_type, path)

    @property
    def config(self) -> PreTrainedConfig:
        return self.vision_tower.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.embeddings.patch_embedding.weight.device

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def is_frozen(self) -> bool:
        return not any(param.requires_grad for param in self.parameters())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, hidden_size] in the tower's dtype."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        grad_context = torch.no_grad() if self.is_frozen else contextlib.nullcontext()
        with grad_context:
            outputs = self.vision_tower(pixel_values, output_hidden_states=True)
            features = outputs.hidden_states[self.select_layer]
            if self.drops_cls:
                features = features[:, 1:]
        return features


def _drop_load_report(record: logging.LogRecord) -> bool:
    """Drop transformers' load table unless it explains an error it raises next (size mismatch, conversion)."""
    message = str(record.msg)
    return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


@contextlib.contextmanager
def quiet_load_report() -> Iterator[None]:
    """Inside, `from_pretrained` prints no table of keys the checkpoint holds but the model does not use (a full
    CLIP directory's text tower; a plain Llama directory has no tower or projector): the callers say what
    matters about a load themselves."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        hf_logger.removeFilter(_drop_load_report)


def _load_clip_vision(path: PathLike, key: str = "model.vision_tower.path", **kwargs) -> PreTrainedModel:
    config = load_vision_config(path, key)  # clear errors for a missing directory or config.json
    with quiet_load_report():  # a full CLIP/SigLIP directory's text_model.* weights are expected to go unused
        return vision_classes(config.model_type)[1].from_pretrained(str(path), **kwargs)
