"""`CLIPVisionTower`: transformers' `CLIPVisionModel` plus LLaVA's feature selection.

The wrapped model lives at `.vision_tower`, so inside the full model its weights are saved under
`model.vision_tower.vision_tower.*`, the layout LLaVA uses.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Union

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vir.models.configuration import LlavaLlamaConfig, check_select_feature
from vir.models.model_types import TOWER_TYPES, check_model_type
from vir.utils.errors import UserError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def load_vision_config(path: PathLike, key: str = "model.vision_tower.path") -> CLIPVisionConfig:
    """Read the CLIP vision config from a local CLIP or CLIPVision directory (`key` names it in errors)."""
    check_model_type(_checked_dir(path, key), key, TOWER_TYPES)
    # Reads either layout: a CLIPVisionConfig, or a CLIPConfig whose `vision_config` part is taken.
    return CLIPVisionConfig.from_pretrained(str(path))


def _checked_dir(path: PathLike, key: str) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{key}={path} is not a directory; point it at a local HF CLIP model directory")
    return directory


class CLIPVisionTower(nn.Module):
    """CLIP image encoder returning one feature vector per image token.

    forward(pixel_values [N, 3, H, W]) -> [N, num_image_tokens, mm_hidden_size], taken from
    `hidden_states[select_layer]`; 'patch' drops the CLS token, 'cls_patch' keeps it. All N images go through
    the tower in one call. When every parameter is frozen (requires_grad False) the tower runs under
    `torch.no_grad()`, so no activations are kept for a backward pass that will never reach it.
    """

    def __init__(self, vision_config: CLIPVisionConfig, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        check_select_feature(select_feature)
        self.select_layer = select_layer
        self.select_feature = select_feature
        self.vision_tower = CLIPVisionModel._from_config(vision_config)
        # Read by the parent's post_init, so device maps never split a CLIP layer across devices.
        self._no_split_modules = set(self.vision_tower._no_split_modules)

    @classmethod
    def from_config(cls, config: LlavaLlamaConfig) -> "CLIPVisionTower":
        """A random-init tower shaped and configured by `config` (weights come from a checkpoint later)."""
        return cls(config.vision_config, config.mm_vision_select_layer, config.mm_vision_select_feature)

    @classmethod
    def from_pretrained(
        cls, path: PathLike, select_layer: int = -2, select_feature: str = "patch", **kwargs
    ) -> "CLIPVisionTower":
        """A tower loaded from a local CLIP or CLIPVision directory; `kwargs` go to `from_pretrained` (dtype)."""
        with torch.device("meta"):  # shapes only: the loaded model replaces the random one
            tower = cls(load_vision_config(path), select_layer, select_feature)
        tower.vision_tower = _load_clip_vision(path, **kwargs)
        return tower

    def load_pretrained_weights(self, path: PathLike, key: str = "model.vision_tower.path") -> None:
        """Copy the weights of a local CLIP or CLIPVision directory into this tower (shapes must match)."""
        loaded = _load_clip_vision(path, key=key, dtype=self.dtype)
        result = self.vision_tower.load_state_dict(loaded.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(
                f"{key}={path} does not match the configured vision tower: "
                f"missing {sorted(result.missing_keys)}, unexpected {sorted(result.unexpected_keys)}"
            )
        logger.info("loaded CLIP vision tower weights from %s", path)

    @property
    def config(self) -> CLIPVisionConfig:
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
            if self.select_feature == "patch":
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


def _load_clip_vision(path: PathLike, key: str = "model.vision_tower.path", **kwargs) -> CLIPVisionModel:
    load_vision_config(path, key)  # clear errors for a missing directory or config.json
    with quiet_load_report():  # a CLIP directory's text_model.* weights are expected to go unused
        return CLIPVisionModel.from_pretrained(str(path), **kwargs)
