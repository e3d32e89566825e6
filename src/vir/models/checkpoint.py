"""Run directories: the one writer of LLaVA artifacts and the one loader, shared by trainer, eval, chat, export.

A run directory (and every `checkpoint-N/` in it) holds:

    mm_projector.bin          projector weights under LLaVA's keys (model.mm_projector.0.weight, ...)
    adapter_model.safetensors + adapter_config.json     (stage2_lora)   or
    model.safetensors + config.json                     (stage2_full: all weights)
    config.json               the LLaVA config of the LLM's family (always; model_type llava_<family>)
    tokenizer files           the prepared tokenizer (with <image> and pad)
    preprocessor_config.json  the tower's image processor (CLIP or SigLIP)
    vir_config.yaml           the resolved Hydra config the run was made with

Runs that save neither full weights nor an adapter (stage1) are rebuilt from the base directories named in
`vir_config.yaml` (`model.llm.path`, `model.vision_tower.path`) plus `mm_projector.bin`.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from vir.models.builder import DTYPES, build_model
from vir.models.families import llava_model_class, register_saved_type
from vir.models.image_processors import ImageProcessor, load_image_processor
from vir.models.model_types import model_type_of
from vir.models.projector import PROJECTOR_FILE, load_projector_state_dict, save_projector
from vir.models.quantization import QUANTIZATIONS, is_quantized, quantized_loading
from vir.utils.errors import UserError
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "vir_config.yaml"
ADAPTER_CONFIG_FILE = "adapter_config.json"
FULL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")



def write_run_artifacts(
    output_dir: PathLike,
    model: torch.nn.Module,
    state_dict: Optional[dict] = None,
    image_processor=None,
    tokenizer: Optional[PreTrainedTokenizerBase] = None,
    run_config: Optional[DictConfig] = None,
) -> None:
    """Write everything but the adapter/full weights (the Trainer's `save_pretrained` writes those).

    `state_dict`, when given (e.g. gathered by DeepSpeed), is the source of the projector weights; otherwise
    the live model is. `model` may be a peft model.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_projector(model, out / PROJECTOR_FILE, state_dict)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.save_pretrained(str(out))
    if image_processor is not None:
        image_processor.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if run_config is not None:
        OmegaConf.save(run_config, out / RUN_CONFIG_FILE, resolve=True)


def require_run_dir(run_dir: PathLike) -> Path:
    """`run_dir` as a Path; `FileNotFoundError` in one line when it is not a vir run directory (or checkpoint)."""
    run = Path(run_dir)
    if not (run / RUN_CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run} is not a vir run directory: {RUN_CONFIG_FILE} is missing")
    return run


def load_run(
    run_dir: PathLike, merge_adapter: bool = False, device: Optional[str] = None, dequantize: bool = False,
    quantize: Optional[str] = None,
) -> Tuple[torch.nn.Module, PreTrainedTokenizerBase, ImageProcessor, DictConfig]:
    """(model, tokenizer, image_processor, run_config) from a run directory or `checkpoint-N/`, in eval mode,
    on `device` (default: the GPU when there is one, else the CPU).

    Full-weight runs load with `from_pretrained`; adapter and projector-only runs are rebuilt from the base
    model the run config names, then get `mm_projector.bin` and the peft adapter on top. With
    `merge_adapter`, LoRA is merged into the base weights and the family's plain LLaVA model is returned.
    With `dequantize`, a QLoRA run's 4/8-bit base is turned back into `model.llm.dtype` weights (the values the
    adapter trained against, de-quantised) before the adapter goes on: merging then folds LoRA in exactly.
    With `quantize` (`nf4` or `int8`), the LLM loads with bitsandbytes (tower, projector and head in full
    precision) whatever the run trained with: to serve a run on a small GPU.
    """
    run = require_run_dir(run_dir)
    run_config = OmegaConf.load(run / RUN_CONFIG_FILE)
    check_weight_files(run)
    tokenizer = AutoTokenizer.from_pretrained(str(run))
    image_processor = load_image_processor(run, "run directory")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZATIONS)}")
    if any((run / name).is_file() for name in FULL_WEIGHT_FILES):
        llm_cfg = OmegaConf.merge(run_config.model.llm, {"quantization": quantize or "none"})
        placement = quantized_loading(llm_cfg, _compute_dtype(llm_cfg.dtype))
        model = saved_model_class(run).from_pretrained(str(run), **placement)
    else:
        model_cfg = run_config.model.copy()
        if quantize is not None:
            model_cfg.llm.quantization = quantize
            model_cfg.llm.dtype = str(_compute_dtype(model_cfg.llm.dtype)).removeprefix("torch.")
        _require_base(model_cfg, run)
        model_cfg.pretrained_projector = None
        model = build_model(model_cfg, tokenizer, image_aspect_ratio=run_config.data.image_aspect_ratio)
        load_projector_state_dict(model, run / PROJECTOR_FILE)
        if dequantize and is_quantized(model):
            model = model.dequantize()
            logger.info("de-quantised the %s base of %s", model_cfg.llm.quantization, run)
        if (run / ADAPTER_CONFIG_FILE).is_file():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(run))
            if merge_adapter:
                model = model.merge_and_unload()
    if not is_quantized(model):  # a quantized model was placed while it loaded and cannot move
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.eval()
    return model, tokenizer, image_processor, run_config


def saved_model_class(directory: PathLike) -> type:
    """The LLaVA class of the family a saved run or checkpoint directory holds (its config.json's llava_<family>)."""
    register_saved_type(model_type_of(directory, "run directory"))
    return llava_model_class(AutoConfig.from_pretrained(str(directory)))


def check_weight_files(run_dir: PathLike, also: Tuple[str, ...] = ()) -> None:
    """Raise `UserError` naming the first weight file of `run_dir` that is cut short or corrupt: each
    `*.safetensors` (its header read and its length checked against it, no tensor loaded) and each weight
    `.bin` (`mm_projector.bin`, `pytorch_model*.bin`, and the torch files named in `also`, e.g. a checkpoint's
    `optimizer.pt`; a pickle `weights_only` refuses is left to the loader)."""
    run = Path(run_dir)
    for path in sorted(run.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as err:  # SafetensorError: "incomplete metadata", "header too small", ...
            raise _damaged(path, err) from None
    for path in sorted({run / PROJECTOR_FILE, *run.glob("pytorch_model*.bin"), *(run / name for name in also)}):
        if not path.is_file():
            continue
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError:
            continue
        except Exception as err:  # a cut zip archive: OSError, RuntimeError ("failed finding central directory")
            raise _damaged(path, err) from None


def _damaged(path: Path, err: Exception) -> UserError:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UserError(f"{path} is truncated or corrupt ({reason}): re-export or re-copy it, or use an earlier "
                     "checkpoint")


def _compute_dtype(name: str) -> torch.dtype:
    """The matmul dtype of 4/8-bit layers: the run's, or bf16 (QLoRA's) for a float32 run."""
    return torch.bfloat16 if DTYPES[name] == torch.float32 else DTYPES[name]


def _require_base(model_cfg: DictConfig, run: Path) -> None:
    missing = [key for key, value in (("model.llm.path", model_cfg.llm.path),
                                      ("model.vision_tower.path", model_cfg.vision_tower.path)) if not value]
    if missing:
        raise UserError(
            f"{run} holds no full weights and its config has no {' / '.join(missing)}: the base model it was "
            "trained from cannot be rebuilt. Train from local base directories, or use training.mode=stage2_full."
        )
