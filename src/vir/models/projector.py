"""The multimodal projector (CLIP features -> LLM embeddings) and its `mm_projector.bin` artifact.

Module layouts match the original LLaVA, so its checkpoints load unchanged and ours load there:
    linear      nn.Linear                           model.mm_projector.{weight,bias}
    mlp2x_gelu  Linear -> GELU -> Linear            model.mm_projector.{0,2}.{weight,bias}
    identity    nn.Identity                         (no weights)
`projector_state_dict`, `save_projector` and `load_projector_state_dict` are the one way to write and read
the projector artifact (trainer, export and chat all use them).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from transformers import PreTrainedConfig

from vir.models.configuration import PROJECTOR_TYPE_PATTERN, check_projector_type, is_llava_config
from vir.utils.errors import UserError
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

PROJECTOR_FILE = "mm_projector.bin"
KEY_PREFIX = "model.mm_projector."


class LlavaMultiModalProjector(nn.Sequential):
    """LLaVA's `mlp{depth}x_gelu`: Linear(mm_hidden, H) followed by (GELU, Linear(H, H)) x (depth - 1).

    [..., mm_hidden_size] -> [..., hidden_size]. A Sequential so the parameters are named `0.*`, `2.*`, ...
    exactly as in LLaVA's checkpoints.
    """

    def __init__(self, mm_hidden_size: int, hidden_size: int, depth: int = 2):
        layers = [nn.Linear(mm_hidden_size, hidden_size)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
        super().__init__(*layers)


def build_projector(config: PreTrainedConfig) -> nn.Module:
    """The projector named by `config.mm_projector_type`: [..., mm_hidden_size] -> [..., hidden_size]."""
    projector_type = config.mm_projector_type
    check_projector_type(projector_type)
    if projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    if projector_type == "identity":
        return nn.Identity()
    depth = int(PROJECTOR_TYPE_PATTERN.match(projector_type).group(2))
    return LlavaMultiModalProjector(config.mm_hidden_size, config.hidden_size, depth)


def projector_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The projector weights under LLaVA's keys (`model.mm_projector.0.weight`, ...), detached, on CPU.

    `model` may be a LLaVA causal LM (any family), its base model, or a peft model wrapping either.
    """
    projector = _projector_module(model)
    state = {KEY_PREFIX + name: tensor.detach().cpu().clone() for name, tensor in projector.state_dict().items()}
    _check_keys(model, {key[len(KEY_PREFIX) :] for key in state}, source="the model's mm_projector")
    return state


def projector_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The projector entries of a whole model's state dict (any prefix: peft's, DeepSpeed's), under LLaVA's keys."""
    marker = "mm_projector."
    return {KEY_PREFIX + key.rpartition(marker)[2]: tensor.detach().cpu().clone()
            for key, tensor in state_dict.items() if marker in key}


def save_projector(model: nn.Module, path: PathLike, state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Write the projector weights; `path` is a file (.bin or .safetensors) or a directory (gets mm_projector.bin).

    `state_dict`, when given and holding the projector (a whole model's, e.g. gathered by DeepSpeed), is the
    source of the weights; otherwise the live `model` is. Returns the file written.
    """
    path = Path(path)
    target = path if path.suffix in (".bin", ".safetensors") else path / PROJECTOR_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    state = projector_from_state_dict(state_dict) if state_dict is not None else {}
    state = state or projector_state_dict(model)
    if target.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(target))
    else:
        torch.save(state, target)
    logger.info("saved mm_projector (%d tensors) to %s", len(state), target)
    return target


def load_projector_state_dict(model: nn.Module, path_or_state: Union[PathLike, Mapping[str, torch.Tensor]]) -> None:
    """Load projector weights into `model` in place (values are cast to the projector's dtype and device).

    `path_or_state` is a state dict, a `mm_projector.bin` / `.safetensors` file, or a directory holding
    `mm_projector.bin` (or `mm_projector.safetensors`). Keys may carry any prefix ending in `mm_projector.`
    (`model.mm_projector.0.weight` from LLaVA, `base_model.model.model.mm_projector.0.weight` from peft).
    Raises ValueError listing the missing / unexpected keys when the file does not fit the configured
    projector type.
    """
    source = str(path_or_state) if isinstance(path_or_state, (str, Path)) else "the given state dict"
    state = load_projector_file(path_or_state) if isinstance(path_or_state, (str, Path)) else path_or_state
    stripped, unexpected = split_projector_keys(state)
    if unexpected:
        raise ValueError(f"{source} holds keys that are not projector weights: {sorted(unexpected)}")
    _check_keys(model, set(stripped), source=source)
    projector = _projector_module(model)
    expected = {name: tuple(tensor.shape) for name, tensor in projector.state_dict().items()}
    wrong = {k: (tuple(t.shape), expected[k]) for k, t in stripped.items() if tuple(t.shape) != expected[k]}
    if wrong:
        raise ValueError(f"{source} has projector weights of the wrong shape (found, expected): {wrong}")
    projector.load_state_dict(stripped, strict=True)
    logger.info("loaded mm_projector (%d tensors) from %s", len(stripped), source)


def split_projector_keys(state: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(`{name inside the projector: tensor}`, keys that are no projector weight): any prefix ending in
    `mm_projector.` is dropped (LLaVA's, peft's `base_model.model.model.`)."""
    stripped, unexpected = {}, []
    for key, tensor in state.items():
        _, marker, name = key.rpartition("mm_projector.")
        if marker:
            stripped[name] = tensor
        else:
            unexpected.append(key)
    return stripped, unexpected


def load_projector_file(path: PathLike) -> Mapping[str, torch.Tensor]:
    """The tensors of a projector file (`.bin` read with `weights_only`, or `.safetensors`), or of the
    `mm_projector.bin` / `.safetensors` in a directory; keys as stored."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / PROJECTOR_FILE, path / "mm_projector.safetensors"]
        found = [candidate for candidate in candidates if candidate.is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither {candidates[0].name} nor {candidates[1].name}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"projector file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused a global: the file could run code
        raise UserError(f"{path}: refused: it holds Python objects besides tensors, which could run code when "
                        f"loaded ({str(err).splitlines()[-1]}); save the projector's tensors alone, or as "
                        "safetensors") from None


def _projector_module(model: nn.Module) -> nn.Module:
    """The mm_projector inside `model`, looking through peft wrappers (PeftModel, modules_to_save)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = base.get_model() if hasattr(base, "get_model") else base
    projector = getattr(base, "mm_projector", None)
    if projector is None:
        raise TypeError(f"{type(model).__name__} has no mm_projector; expected a LLaVA model")
    if hasattr(projector, "modules_to_save") and hasattr(projector, "active_adapters"):
        projector = projector.modules_to_save[projector.active_adapters[0]]
    return projector


def _check_keys(model: nn.Module, found: set, source: str) -> None:
    """Compare projector parameter names (without prefix) with the plain layout of the configured type."""
    config = _config_of(model)
    with torch.device("meta"):
        expected = set(build_projector(config).state_dict())
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not fit mm_projector_type={config.mm_projector_type!r}: "
            f"missing {[KEY_PREFIX + k for k in missing]}, unexpected {[KEY_PREFIX + k for k in unexpected]} "
            "(a projector wrapped by LoRA, or one saved for another projector type?)"
        )


def _config_of(model: nn.Module) -> PreTrainedConfig:
    config = getattr(model, "config", None)
    if config is None or not is_llava_config(config):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
    return config
