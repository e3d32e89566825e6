"""Checks a run passes before any weight loads: each failure is one `ConfigError` naming the key and the fix.

`check_output_dir` and `check_run(cfg)` need only the config (output directory; paths, mode and option
combinations, precision, batch layout); `check_projector_fits(cfg, model_config)` needs the model config
`build_inputs` derives without weights (a pretrained projector against the tower's and the LLM's widths).
"""

from __future__ import annotations

import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import SchedulerType

from vir.data.images import IMAGE_ASPECT_RATIOS
from vir.data.templates import TEMPLATES
from vir.models.builder import TOKENIZER_FILES
from vir.models.model_types import MODEL_DIR_TYPES, check_model_dir
from vir.models.projector import KEY_PREFIX, build_projector, load_projector_file, split_projector_keys
from vir.models.quantization import QUANTIZATIONS
from vir.training.batching import batch_layout
from vir.training.distributed import run_state
from vir.training.modes import check_mode
from vir.utils.paths import made_directories
from vir.utils.config import ConfigError


def check_run(cfg: Any) -> None:
    """Everything about the run that a config alone can get wrong (see module doc), but the output directory
    and the values: `check_output_dir` and `check_values` come first, before anything (an import) writes
    there or the output directory is judged."""
    _check_paths(cfg)
    _check_options(cfg)
    _check_precision(cfg)
    batch_layout(cfg.training, run_state().num_processes)


def check_output_dir(value: str, key: str = "training.output_dir", probe: bool = True) -> None:
    """The output directory can be created and written: no ancestor is a file, and (with `probe`) a probe file
    can be written (tried for real: permission bits say nothing to root, nor about a read-only mount). What the
    probe created is removed again. Under several processes only the main one probes (they would race over
    the directories it creates and removes)."""
    path = Path(value).absolute()
    if _is_system_dir(path):
        raise ConfigError(f"{key}={value} is a system directory: vir fills its output directory with checkpoints or "
                          "weights and may replace files there; choose a directory of its own (e.g. runs/my_run)")
    for ancestor in (path, *path.parents):
        # One stat per directory: the main process's probe may create and remove these meanwhile (an `exists`
        # then `is_dir` pair could see a directory vanish in between and call it a file).
        try:
            mode = ancestor.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISDIR(mode):
            raise ConfigError(f"{key}={value}: {ancestor} is a file, not a directory; choose another {key}")
        break
    if not probe:
        return
    try:
        with made_directories(path), tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ConfigError(f"{key}={value} cannot be written ({err.strerror or err}); choose a directory you can "
                          "write to") from None


# Never a run's output directory: the root, the top-level system directories, and everything under those the
# operating system owns. A home directory itself is refused too, a folder inside it is fine.
_SYSTEM_TOP = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
               "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var")
_SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/proc", "/sbin", "/sys", "/usr")


def _is_system_dir(path: Path) -> bool:
    path = Path(os.path.normpath(path))
    return (str(path) in _SYSTEM_TOP or path == Path.home()
            or any(path.is_relative_to(tree) for tree in _SYSTEM_TREES))


def check_values(cfg: Any) -> None:
    """Numbers in their range (a NaN learning rate, LoRA of rank 0) and names among the choices, before any
    weight loads rather than as a traceback from deep inside a library. Reads nothing but the config."""
    t, model = cfg.training, cfg.model
    ranges = [  # (key, value, lowest, lowest allowed itself, optional)
        ("training.learning_rate", t.learning_rate, 0.0, True, False),  # 0: a run that changes no weight
        ("training.mm_projector_lr", t.mm_projector_lr, 0.0, True, True),
        ("training.vision_tower_lr", t.vision_tower_lr, 0.0, True, True),
        ("training.num_train_epochs", t.num_train_epochs, 0.0, False, False),
        ("training.weight_decay", t.weight_decay, 0.0, True, False),
        ("training.lora_alpha", t.lora_alpha, 0.0, False, False),
        ("training.lora_r", t.lora_r, 1, True, False),
        ("training.logging_steps", t.logging_steps, 1, True, False),
        ("training.save_steps", t.save_steps, 1, True, False),
        ("training.eval_steps", t.eval_steps, 1, True, True),
        ("training.save_total_limit", t.save_total_limit, 1, True, True),
        ("training.per_device_train_batch_size", t.per_device_train_batch_size, 1, True, False),
        ("training.per_device_eval_batch_size", t.per_device_eval_batch_size, 1, True, False),
        ("training.gradient_accumulation_steps", t.gradient_accumulation_steps, 1, True, False),
        ("training.length_grouping", t.length_grouping, 1, True, False),
        ("training.max_nonfinite_steps", t.max_nonfinite_steps, 0, True, False),
        ("training.loss_chunk_size", t.loss_chunk_size, 0, True, False),
        ("model.model_max_length", model.model_max_length, 1, True, False),
    ]
    for key, value, lowest, inclusive, optional in ranges:
        if value is None and optional:
            continue
        if not math.isfinite(value) or value < lowest or (value == lowest and not inclusive):
            bound = f">= {lowest}" if inclusive else f"> {lowest}"
            raise ConfigError(f"{key}={value} must be a finite number {bound}" + (" (or null)" if optional else ""))
    for key, value in (("training.lora_dropout", t.lora_dropout), ("training.warmup_ratio", t.warmup_ratio)):
        if not (0.0 <= value < 1.0):  # NaN fails both comparisons
            raise ConfigError(f"{key}={value} must be in [0, 1)")
    if t.max_steps != -1 and t.max_steps < 1:
        raise ConfigError(f"training.max_steps={t.max_steps} must be >= 1, or -1 (train training.num_train_epochs)")
    choices = [("data.template", cfg.data.template, tuple(TEMPLATES)),
               ("data.image_aspect_ratio", cfg.data.image_aspect_ratio, IMAGE_ASPECT_RATIOS),
               ("training.lr_scheduler_type", t.lr_scheduler_type, tuple(s.value for s in SchedulerType))]
    for key, value, allowed in choices:
        if value not in allowed:
            raise ConfigError(f"{key}={value} is not one of {', '.join(allowed)}")


def _check_paths(cfg: Any) -> None:
    data = cfg.data
    if data.image_folder is not None and not Path(data.image_folder).is_dir():
        raise ConfigError(f"data.image_folder={data.image_folder} is not a directory; point it at the folder the "
                          "records' image paths are relative to")
    for key, value in (("model.llm.path", cfg.model.llm.path), ("model.vision_tower.path", cfg.model.vision_tower.path),
                       ("model.tokenizer_path", cfg.model.tokenizer_path)):
        if value is not None and not Path(value).is_dir():
            raise ConfigError(f"{key}={value} is not a directory; point it at a local Hugging Face directory")
        if value is not None and key in MODEL_DIR_TYPES:
            check_model_dir(value, key)
        if value is not None and _inside(cfg.training.output_dir, value):
            raise ConfigError(f"training.output_dir={cfg.training.output_dir} lies in {key}={value}: a run writes its "
                              "config, tokenizer and weights there; choose a directory of its own")
    tokenizer_dir = cfg.model.tokenizer_path or cfg.model.llm.path
    if tokenizer_dir is not None and not any((Path(tokenizer_dir) / name).is_file() for name in TOKENIZER_FILES):
        key = "model.tokenizer_path" if cfg.model.tokenizer_path else "model.llm.path"
        raise ConfigError(f"{key}={tokenizer_dir} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}); set "
                          "model.tokenizer_path to the LLM's tokenizer directory")
    projector = cfg.model.pretrained_projector
    if projector is not None and not Path(projector).exists():
        raise ConfigError(f"model.pretrained_projector={projector}: no such file (a LLaVA mm_projector.bin, or the "
                          "stage-1 run directory holding one)")


def _inside(path: Any, directory: Any) -> bool:
    """Whether `path` is `directory` or lies inside it (symlinks resolved)."""
    return Path(str(path)).resolve().is_relative_to(Path(str(directory)).resolve())


def _check_options(cfg: Any) -> None:
    t, model = cfg.training, cfg.model
    check_mode(t.mode, model.vision_tower.freeze)
    if model.llm.quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.llm.quantization={model.llm.quantization} is not one of {', '.join(QUANTIZATIONS)}")
    if model.llm.quantization != "none":
        if t.mode != "stage2_lora":
            raise ConfigError(f"model.llm.quantization={model.llm.quantization} loads the LLM as frozen low-bit "
                              f"weights: it trains with training.mode=stage2_lora (QLoRA), not {t.mode}")
        if model.llm.path is None:
            raise ConfigError("model.llm.quantization needs model.llm.path: quantisation loads a pretrained "
                              "checkpoint (a random-init LLM has nothing worth quantising)")
    if cfg.data.template == "plain" and t.mode != "stage1":
        named = ", ".join(name for name in TEMPLATES if name not in ("plain", "auto"))
        raise ConfigError(f"data.template=plain is LLaVA's stage-1 caption format (no chat turns); "
                          f"training.mode={t.mode} trains conversations: use the chat template of the LLM's family "
                          f"(data.template=auto, or one of {named})")
    for key, value in (("data.pack_row_tokens", cfg.data.pack_row_tokens),
                       ("training.max_tokens_per_batch", t.max_tokens_per_batch)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}={value} must be >= 1 (or null)")
    tower = model.vision_tower
    if tower.path is None and tower.image_size % tower.patch_size:
        raise ConfigError(f"model.vision_tower.image_size={tower.image_size} is not a multiple of "
                          f"model.vision_tower.patch_size={tower.patch_size}")


def _check_precision(cfg: Any) -> None:
    t = cfg.training
    if t.bf16 and t.fp16:
        raise ConfigError("training.bf16 and training.fp16 are both true: choose one")
    wants_bf16 = t.bf16 or cfg.model.llm.dtype == "bfloat16"
    if not wants_bf16:
        return
    key = "training.bf16" if t.bf16 else "model.llm.dtype=bfloat16"
    if torch.cuda.is_available():
        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{key}: {torch.cuda.get_device_name()} has no bfloat16 (compute capability 8.0 or "
                              "later needed); use training.fp16=true and model.llm.dtype=float16")
    elif not _cpu_bf16_works():
        raise ConfigError(f"{key}: this CPU's PyTorch cannot compute in bfloat16; set training.bf16=false and "
                          "model.llm.dtype=float32")


def _cpu_bf16_works() -> bool:
    try:
        x = torch.ones(2, 2, dtype=torch.bfloat16)
        return bool(torch.isfinite((x @ x).float()).all())
    except RuntimeError:
        return False


def check_projector_fits(cfg: Any, model_config: Any) -> None:
    """`model.pretrained_projector` has the keys and shapes this model's projector needs (the tower's width in,
    the LLM's out), read before any weights load."""
    path = cfg.model.pretrained_projector
    if path is None:
        return
    with torch.device("meta"):
        expected = {KEY_PREFIX + name: tuple(t.shape) for name, t in build_projector(model_config).state_dict().items()}
    stripped, _ = split_projector_keys(load_projector_file(path))  # other keys: load_projector_state_dict names them
    found = {KEY_PREFIX + name: tuple(t.shape) for name, t in stripped.items()}
    if found != expected:
        raise ConfigError(
            f"model.pretrained_projector={path} does not fit this model (model.projector_type="
            f"{cfg.model.projector_type}, vision width {model_config.mm_hidden_size} -> LLM width "
            f"{model_config.hidden_size}): expected {expected}, found {found}")
