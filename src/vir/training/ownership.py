"""A run directory belongs to one run.

A run's *identity* is its resolved config less the keys that change neither what it trains nor what its step
numbers mean (`OPERATIONAL_KEYS`: where it logs, saves and evaluates, how much memory a step takes, what it is
tested on afterwards), plus the samples each optimizer step takes (`training.effective_batch_size`: micro-batch
x accumulation x processes, so the same global batch on another number of GPUs is the same run). Two configs
with one identity train the same weights step for step, so a checkpoint of one resumes the other; any other
difference (the data, a model path, the mode, LoRA's rank, the learning rate, `max_steps`, the seed) makes
another run, whose checkpoints `auto` must never pick up.

The identity is recorded in `<output_dir>/run_identity.json` when training starts (runs from before it existed
are read from the `vir_config.yaml` of their newest checkpoint or of their final artifacts). `claim_decision`
says what a new invocation may do with a directory: resume it, report it finished, start fresh, or stop with
one line naming the differing keys and the choices.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from vir.models.checkpoint import RUN_CONFIG_FILE
from vir.training.batching import batch_layout
from vir.training.checkpoints import (
    COMPLETE_FILE,
    STAGING_DIR,
    checkpoint_dirs,
    final_weight_files,
    newest_complete_checkpoint,
    resume_target,
)
from vir.utils.config import ConfigError

logger = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
EFFECTIVE_BATCH_KEY = "training.effective_batch_size"

# Keys (or whole sections) that may differ between the invocations of one run.
OPERATIONAL_KEYS = (
    "training.output_dir", "training.resume_from_checkpoint", "training.overwrite_output_dir",
    "training.logging_steps", "training.save_steps", "training.save_total_limit", "training.eval_steps",
    "training.report_to", "training.per_device_eval_batch_size", "training.max_nonfinite_steps",
    "training.gradient_checkpointing", "training.loss_chunk_size",
    # the batch layout enters as EFFECTIVE_BATCH_KEY instead
    "training.global_batch_size", "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
    "data.eval_path", "data.test_path", "data.num_workers", "data.max_image_warnings",
    "model.llm.attn_implementation",
    "validate", "plan", "recipe.eval_max_new_tokens", "recipe.eval_batch_size", "recipe.num_visualizer_samples",
    "experiment_name",
)

# What a run writes at its root besides its weights (`final_weight_files`) and the tokenizer and processor files
# every final save rewrites: removed with the weights when `training.overwrite_output_dir` replaces another run,
# so none of it can load or count as this run's.
_RECORD_FILES = ("config.json", RUN_CONFIG_FILE, "trainer_state.json", "training_args.bin", "data_stats.json",
                 "metrics.json", "curves.png", COMPLETE_FILE, IDENTITY_FILE)
_RECORD_DIRS = (STAGING_DIR, "samples")  # the staging area; the sample visualiser's grids
# Keys naming files or directories: compared as absolute paths (`data/x.json` typed in /work is /work/data/x.json).
PATH_KEYS = ("model.llm.path", "model.vision_tower.path", "model.tokenizer_path", "model.pretrained_projector",
             "model.init_from_hf", "data.train_path", "data.image_folder")
# A directory holding these but no run record holds a model no vir run wrote (a base, an export): never a run's.
_FOREIGN_MARKERS = ("config.json", "vir_export.json")


def run_identity(cfg: DictConfig | dict, num_processes: int) -> Dict[str, object]:
    """The flat `{dotted key: value}` identity of a run config (see module doc; pure)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    flat = _absolute_paths({key: value for key, value in _flat(tree).items() if not _operational(key)})
    training = OmegaConf.create(tree.get("training", {}))
    try:
        micro, accumulation = batch_layout(training, num_processes)
        flat[EFFECTIVE_BATCH_KEY] = micro * accumulation * num_processes
    except (ConfigError, AttributeError):  # a config the preflight checks refuse, or one from an older version
        pass
    return flat


def identity_changes(recorded: Dict[str, object], current: Dict[str, object]) -> List[str]:
    """`key: old -> new` for each key both identities hold with different values (a key only one side has came
    from another version of the schema, not from the user)."""
    recorded, current = _absolute_paths(recorded), _absolute_paths(current)  # a record may hold them as typed
    return [f"{key}: {recorded[key]} -> {current[key]}"
            for key in sorted(recorded.keys() & current.keys()) if recorded[key] != current[key]]


def _absolute_paths(identity: Dict[str, object]) -> Dict[str, object]:
    return {key: os.path.abspath(value) if key in PATH_KEYS and isinstance(value, str) else value
            for key, value in identity.items()}


def recorded_identity(output_dir: Path, num_processes: int) -> Optional[Dict[str, object]]:
    """The identity of the run `output_dir` holds, or None when it holds none (see module doc)."""
    record = output_dir / IDENTITY_FILE
    if record.is_file():
        try:
            return json.loads(record.read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"training.output_dir={output_dir}: {record} is unreadable (a run's identity, cut "
                              "off or edited): remove it to claim the directory, or choose another "
                              "training.output_dir") from None
    newest = newest_complete_checkpoint(output_dir)
    for config in (newest / RUN_CONFIG_FILE if newest else None, output_dir / RUN_CONFIG_FILE):
        if config is not None and config.is_file():
            return run_identity(OmegaConf.load(config), num_processes)
    return None


def holds_work(output_dir: Path) -> bool:
    """Whether `output_dir` holds anything of a run worth keeping: a checkpoint or final weights."""
    return bool(checkpoint_dirs(output_dir)) or bool(final_weight_files(output_dir))


def record_identity(output_dir: Path, identity: Dict[str, object]) -> None:
    """Write `run_identity.json` (atomically: a kill leaves the old record or the new one)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"identity": identity, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    staged = output_dir / f".{IDENTITY_FILE}.tmp"
    staged.write_text(json.dumps(record, indent=2, default=str) + "\n")
    staged.replace(output_dir / IDENTITY_FILE)


def clear_other_run(output_dir: Path) -> None:
    """Remove another run's checkpoints, staging area, weights, records and completion marker from `output_dir`
    (`training.overwrite_output_dir`); what is not a run's (a data folder, the demo's bases) stays."""
    for directory in _replaced_dirs(output_dir):
        shutil.rmtree(directory, ignore_errors=True)
    for path in _replaced_files(output_dir):
        path.unlink(missing_ok=True)


def _replaced_dirs(output_dir: Path) -> List[Path]:
    return [*checkpoint_dirs(output_dir), *(output_dir / name for name in _RECORD_DIRS)]


def _replaced_files(output_dir: Path) -> List[Path]:
    return [*final_weight_files(output_dir), *(output_dir / name for name in _RECORD_FILES)]


def _inputs_in_replaced_run(cfg: DictConfig, output_dir: Path) -> List[str]:
    """`key=value` of each input of `cfg` (a model, the projector, the data) that replacing the run in
    `output_dir` would delete."""
    doomed_dirs = [d.resolve() for d in _replaced_dirs(output_dir)]
    doomed_files = {f.resolve() for f in _replaced_files(output_dir)}
    found = []
    for key in PATH_KEYS:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value not in ("", "???"):
            path = Path(value).resolve()
            if path in doomed_files or any(path.is_relative_to(d) for d in doomed_dirs):
                found.append(f"{key}={value}")
    return found


@dataclass(frozen=True)
class Claim:
    """What this invocation does with its output directory: `finished` (the completion record of this very run,
    nothing to train), else `resume` (a checkpoint path or None: start fresh) and `replace` (clear another
    run's files first); `identity` is the one to record."""

    identity: Dict[str, object]
    resume: Optional[str] = None
    finished: Optional[dict] = None
    replace: bool = False


def claim_decision(cfg: DictConfig, output_dir: Path, num_processes: int) -> Claim:
    """Decide, reading only, what `cfg` may do with `output_dir` (see module doc); raises `ConfigError` (one line:
    the directory, the differing keys, the choices) when it holds another run and nothing said to replace it or
    to continue one of its checkpoints anyway."""
    t = cfg.training
    identity = run_identity(cfg, num_processes)
    recorded = recorded_identity(output_dir, num_processes)
    changes = identity_changes(recorded, identity) if recorded is not None else []
    explicit = t.resume_from_checkpoint not in (None, "auto")
    if recorded is None:
        _refuse_foreign_model(output_dir)
    if changes and holds_work(output_dir):
        if t.overwrite_output_dir:
            inputs = _inputs_in_replaced_run(cfg, output_dir)
            if inputs:
                raise ConfigError(f"training.overwrite_output_dir=true would delete this run's own input "
                                  f"({', '.join(inputs)}) with the run in {output_dir}: copy it out of there first, or "
                                  "choose a new training.output_dir")
            logger.warning("training.overwrite_output_dir=true: replacing the run in %s (%s)", output_dir,
                           "; ".join(changes))
            return Claim(identity, replace=True)
        inside = explicit and Path(t.resume_from_checkpoint).resolve().parent == output_dir.resolve()
        if not inside:
            raise ConfigError(_another_run_message(output_dir, changes, explicit))
    elif changes:
        logger.info("%s records a run that left no checkpoint and no weights: this run takes it over", output_dir)
    if recorded is not None and not changes and t.resume_from_checkpoint == "auto":
        done = _finished_record(output_dir)
        if done is not None:
            return Claim(identity, finished=done)
    resume = resume_target(t.resume_from_checkpoint, output_dir)
    if explicit and not changes and (Path(resume) / RUN_CONFIG_FILE).is_file():
        changes = identity_changes(run_identity(OmegaConf.load(Path(resume) / RUN_CONFIG_FILE), num_processes),
                                   identity)
    if explicit and changes:
        logger.warning("resuming %s, which was trained as another run (training.resume_from_checkpoint names it, "
                       "so it continues anyway): %s", resume, "; ".join(changes))
    return Claim(identity, resume=resume)


def _refuse_foreign_model(output_dir: Path) -> None:
    """A directory with a model in it that no vir run recorded (a base model, an export) is never trained into:
    the run would overwrite its config, tokenizer and weights."""
    found = [name for name in _FOREIGN_MARKERS if (output_dir / name).is_file()]
    found += [p.name for p in final_weight_files(output_dir)]
    if found:
        raise ConfigError(f"training.output_dir={output_dir} holds a model that no vir run wrote ({', '.join(found)}: "
                          "a base model or an export); a run would overwrite its files: choose a directory of its own")


def _finished_record(output_dir: Path) -> Optional[dict]:
    marker = output_dir / COMPLETE_FILE
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        logger.warning("%s is unreadable: finishing the run again from its newest checkpoint", marker)
        return None


def _another_run_message(output_dir: Path, changes: List[str], explicit: bool) -> str:
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    newest = newest_complete_checkpoint(output_dir)
    keep_going = (f", or continue its {newest.name} with training.resume_from_checkpoint={newest}"
                  if newest is not None else "")
    what = "the checkpoint named by training.resume_from_checkpoint belongs to another directory; " if explicit else ""
    return (f"training.output_dir={output_dir} holds another run ({shown}); {what}choose a new training.output_dir, "
            f"set training.overwrite_output_dir=true to replace that run{keep_going}")


def _operational(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in OPERATIONAL_KEYS)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
