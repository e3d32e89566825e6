"""Pieces shared by the base-model recipes: config coercion, run fingerprints, metrics files, Trainer arguments."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Type, TypeVar

import torch
from transformers import TrainerCallback, TrainingArguments

from vir.training.distributed import run_state, sum_over_processes
from vir.utils.errors import UserError
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

T = TypeVar("T")

PRETRAIN_METRICS_FILE = "pretrain_metrics.json"
PACKAGE_PREFIX = "vir:"  # `demo.bases.source=vir:PATH`: PATH inside the installed package
# Bump when a recipe's output changes for the same config, so stale bases are rebuilt.
RECIPE_VERSION = 1


def as_dataclass(cls: Type[T], cfg: Any) -> T:
    """`cls` from an instance of itself, None (defaults), a dict or an OmegaConf node; nested sections too.

    Unknown keys raise ValueError naming them, as Hydra's schema would."""
    if cfg is None:
        return cls()
    if isinstance(cfg, cls):
        return cfg
    cfg = plain(cfg)
    if not isinstance(cfg, Mapping):
        raise TypeError(f"expected a {cls.__name__}, a dict or an OmegaConf node, got {type(cfg).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(fields)}")
    values = {}
    for name, value in cfg.items():
        nested = _field_dataclass(cls, name)
        values[name] = as_dataclass(nested, value) if nested is not None else value
    return cls(**values)


def plain(cfg: Any) -> Any:
    """An OmegaConf node as plain dicts/lists (a DictConfig passes `isinstance(_, Mapping)` but its lists are
    ListConfigs, which neither dataclasses nor json expect); anything else unchanged."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def _field_dataclass(cls: type, name: str) -> Optional[type]:
    default = next(f for f in dataclasses.fields(cls) if f.name == name).default_factory
    if default is dataclasses.MISSING:
        return None
    probe = default()
    return type(probe) if dataclasses.is_dataclass(probe) else None


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able description of what a recipe would build."""
    text = json.dumps({"recipe_version": RECIPE_VERSION, **payload}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_metrics(out_dir: PathLike, digest: str, required: Iterable[str]) -> Optional[Dict[str, Any]]:
    """The saved metrics of a finished run with this fingerprint (all `required` files present), else None."""
    out_dir = Path(out_dir)
    try:
        metrics = json.loads((out_dir / PRETRAIN_METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if metrics.get("fingerprint") != digest or not all((out_dir / name).is_file() for name in required):
        return None
    return metrics


def saved_fingerprint(out_dir: PathLike) -> Optional[str]:
    """The fingerprint in `out_dir`'s `pretrain_metrics.json`, None when there is no readable one."""
    try:
        return json.loads((Path(out_dir) / PRETRAIN_METRICS_FILE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


class BaseMismatchError(UserError):
    """A base copied from `demo.bases.source` was built for other inputs than this config's."""


def refuse_mismatch(kind: str, out_dir: PathLike, digest: str, source: str) -> BaseMismatchError:
    """The error for a base taken from `source` (`demo.bases.source`) whose fingerprint is not this config's: no
    silent retraining (a shipped base stands for hours of CPU), and the message says what to do."""
    found = saved_fingerprint(out_dir)
    shipped = (" The shipped bases fit `experiment=local_debug` as it is; experiment=synthetic_gpu rebuilds them "
               "(~8 minutes of LLM base on one GPU)." if source.startswith(PACKAGE_PREFIX) else "")
    return BaseMismatchError(
        f"demo.bases.source={source}: its {kind} base (copied to {out_dir}, fingerprint {found}) was built for other "
        f"inputs than this config's (fingerprint {digest}): overrides of demo.synthetic.*, model.llm.* / "
        f"model.vision_tower.* sizes or bases.* change what the base would be.{shipped} Set demo.bases.source=null to "
        "train the bases here (experiment=local_debug_scratch trains small ones in ~9 minutes on a 2-core CPU).")


def write_metrics(out_dir: PathLike, metrics: Mapping[str, Any]) -> None:
    """Write `pretrain_metrics.json` atomically; written last, so an interrupted run is redone next time."""
    path = Path(out_dir) / PRETRAIN_METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    os.replace(tmp, path)


def clear_metrics(out_dir: PathLike) -> None:
    (Path(out_dir) / PRETRAIN_METRICS_FILE).unlink(missing_ok=True)


def pretrain_arguments(out_dir: PathLike, *, max_steps: int, batch_size: int, learning_rate: float,
                       weight_decay: float, warmup_ratio: float, seed: int,
                       every_parameter_trains: bool = False) -> TrainingArguments:
    """HF `TrainingArguments` for a base recipe: `batch_size` is the global batch (split over the processes of a
    torchrun run), AdamW (betas 0.9 / 0.98) with linear warm-up then cosine decay to 0, gradients clipped at 1;
    no checkpoints or reporters (a finished base is written once, with its metrics). `every_parameter_trains`
    lets DDP skip its search for parameters without a gradient (a CLIP tower's unused pooler needs it)."""
    world = run_state().num_processes
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} does not split over {world} processes")
    return TrainingArguments(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=batch_size // world,
        learning_rate=learning_rate, weight_decay=weight_decay, warmup_steps=warmup_ratio,
        lr_scheduler_type="cosine", adam_beta2=0.98, adam_epsilon=1e-8, max_grad_norm=1.0,
        save_strategy="no", report_to=[], logging_strategy="no", seed=seed, data_seed=seed,
        dataloader_drop_last=True, remove_unused_columns=False, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), average_tokens_across_devices=False,
        ddp_find_unused_parameters=not every_parameter_trains,
    )


class StepRecords(TrainerCallback):
    """Every `every` optimizer steps, at the last step, and once `max_seconds` of training have passed (then it
    stops the run, every process at once), appends `record(step, seconds)` (on the main process only) to
    `history`. `seconds` counts training steps alone, not the records' own time."""

    def __init__(self, record: Callable[[int, float], Dict[str, Any]], every: int, max_steps: int,
                 max_seconds: Optional[float] = None):
        self.record, self.every, self.max_steps, self.max_seconds = record, every, max_steps, max_seconds
        self.history: list = []
        self.seconds, self._tick = 0.0, 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._tick = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._tick
        out_of_time = self.max_seconds is not None and self.seconds >= self.max_seconds
        if self.max_seconds is not None:  # stop together, as soon as one process is out of time
            out_of_time = bool(sum_over_processes({"out": int(out_of_time)})["out"])
        step = state.global_step
        if (step % self.every == 0 or step == self.max_steps or out_of_time) and state.is_world_process_zero:
            self.history.append(self.record(step, round(self.seconds, 2)))
        if out_of_time:
            logger.warning("base pretraining stopped by max_seconds=%s at step %d/%d", self.max_seconds, step,
                           self.max_steps)
            control.should_training_stop = True
