"""The vision tower's image processor, on transformers' PIL backend (no torchvision).

A tower directory's `preprocessor_config.json` names its class (`CLIPImageProcessor`, `SiglipImageProcessor`, or
their fast / PIL variants); it loads as that family's PIL class. Without one, each tower family has its published
defaults: CLIP resizes the short side and centre-crops with OpenAI's mean/std; SigLIP resizes to a square with
mean and std 0.5 (no crop). The pad-to-square colour of `data.image_aspect_ratio=pad` is the processor's mean.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Union

from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vir.utils.config import ConfigError

logger = logging.getLogger(__name__)

ImageProcessor = Union[CLIPImageProcessorPil, SiglipImageProcessorPil]
PROCESSOR_FILE = "preprocessor_config.json"
# `image_processor_type` without its backend suffix -> the PIL class.
PIL_CLASSES = {"CLIPImageProcessor": CLIPImageProcessorPil, "SiglipImageProcessor": SiglipImageProcessorPil}
# Tower model_type (vision part or full) -> the processor family it ships with.
TOWER_PROCESSORS = {"clip_vision_model": "CLIPImageProcessor", "clip": "CLIPImageProcessor",
                    "siglip_vision_model": "SiglipImageProcessor", "siglip": "SiglipImageProcessor"}


def default_image_processor(tower_type: str, image_size: int) -> ImageProcessor:
    """The published preprocessing of a tower family at `image_size` px."""
    if TOWER_PROCESSORS.get(tower_type) == "SiglipImageProcessor":
        return SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3, resample=3)
    return clip_image_processor(image_size)


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP's preprocessing at `image_size`: OpenAI mean/std, bicubic resize of the short side + centre crop."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )


def processor_class(directory: Union[str, Path], key: str = "model.vision_tower.path") -> type:
    """The PIL image-processor class a directory's `preprocessor_config.json` names (CLIP's when it names none)."""
    config_file = Path(directory) / PROCESSOR_FILE
    try:
        declared = json.loads(config_file.read_text()).get("image_processor_type") or "CLIPImageProcessor"
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"{key}={directory}: {config_file} is not a readable JSON object ({err})") from None
    family = declared.removesuffix("Fast").removesuffix("Pil")
    if family not in PIL_CLASSES:
        raise ConfigError(f"{key}={directory}: {PROCESSOR_FILE} declares a {declared}; the image processors "
                          f"supported are {', '.join(PIL_CLASSES)} (and their Fast/Pil variants)")
    return PIL_CLASSES[family]


def load_image_processor(directory: Union[str, Path], key: str = "model.vision_tower.path") -> ImageProcessor:
    """The image processor saved in `directory`, as its family's PIL class."""
    return processor_class(directory, key).from_pretrained(str(directory))

