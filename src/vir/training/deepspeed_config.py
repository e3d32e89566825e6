"""`training.deepspeed`: a shipped ZeRO config by name (zero2 | zero3 | zero3_offload) or a JSON file of the user's.

The shipped configs (`vir/conf/deepspeed/*.json`) leave batch sizes, accumulation, clipping and precision as
"auto", which HF's Trainer fills from `training.*`; the optimizer and schedule stay the Trainer's (our parameter
groups). On a machine without a GPU the run selects DeepSpeed's CPU accelerator and gloo itself.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Dict, Optional

import torch

from vir.utils.config import ConfigError

SHIPPED = ("zero2", "zero3", "zero3_offload")


def resolve_deepspeed(name_or_path: Optional[str]) -> Optional[str]:
    """The JSON file for `training.deepspeed` (None when unset); ConfigError naming the key when it is neither a
    shipped name nor an existing file."""
    if not name_or_path:
        return None
    if name_or_path in SHIPPED:
        return str(resources.files("vir.conf") / "deepspeed" / f"{name_or_path}.json")
    if Path(name_or_path).is_file():
        return str(name_or_path)
    raise ConfigError(f"training.deepspeed={name_or_path}: neither one of {', '.join(SHIPPED)} nor a JSON file")


def deepspeed_arguments(name_or_path: Optional[str]) -> Dict[str, object]:
    """`TrainingArguments` keywords for `training.deepspeed` ({} when unset). Without CUDA: DeepSpeed's CPU
    accelerator (`DS_ACCELERATOR=cpu`, set before DeepSpeed is first imported) and the gloo backend."""
    config = resolve_deepspeed(name_or_path)
    if config is None:
        return {}
    arguments: Dict[str, object] = {"deepspeed": config}
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        arguments["ddp_backend"] = "gloo"
    return arguments
