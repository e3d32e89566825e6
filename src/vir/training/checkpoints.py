"""Checkpoints that are either complete or absent, and where a run resumes from.

A checkpoint is written into `<output_dir>/.staging/checkpoint-N` and renamed into place only once every file
of it (weights, projector, optimizer, scheduler, RNG, `trainer_state.json`) is on disk: a process killed while
saving leaves a staging directory, never a half-written `checkpoint-N`. `training.resume_from_checkpoint=auto`
takes the newest complete checkpoint; a run that ended writes `training_complete.json` beside its final
artifacts, so re-running the same command skips it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from vir.models.checkpoint import check_weight_files
from vir.utils.config import ConfigError
from vir.utils.errors import UserError

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
COMPLETE_FILE = "training_complete.json"
STATE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
REPLACED_SUFFIX = ".replaced"  # `publish`: what it replaces, moved aside until the new one is in place
RESUME_FILES = ("optimizer.pt", "scheduler.pt")  # besides the weights, what the Trainer loads to resume
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dirs(output_dir: Path) -> List[Path]:
    """Every `checkpoint-N` directory in `output_dir`, oldest step first (complete or not)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


# The weights a loader takes from a run's root (full, sharded, adapter, projector), in every format it reads.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin",
                 "adapter_config.json", "mm_projector.bin")
_WEIGHT_FILE_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def final_weight_files(output_dir: Path) -> List[Path]:
    """The weight files present at `output_dir`'s root (see `_WEIGHT_FILES`)."""
    found = [output_dir / name for name in _WEIGHT_FILES if (output_dir / name).exists()]
    return found + [p for pattern in _WEIGHT_FILE_PATTERNS for p in sorted(output_dir.glob(pattern))]


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / STATE_FILE).is_file()


def newest_complete_checkpoint(output_dir: Path) -> Optional[Path]:
    """The newest checkpoint with its trainer state, skipping (with a warning) any without one."""
    for checkpoint in reversed(checkpoint_dirs(output_dir)):
        if is_complete(checkpoint):
            return checkpoint
        logger.warning("%s has no %s (written by an older version or another tool, cut off while saving): "
                       "not resuming from it", checkpoint, STATE_FILE)
    return None


def resume_target(resume: Optional[str], output_dir: Path) -> Optional[str]:
    """What `training.resume_from_checkpoint` means for this run: a checkpoint path or None (start fresh).

    `auto`: the newest complete checkpoint in `output_dir`, or none; a path must be a checkpoint directory.
    """
    if resume is None:
        existing = checkpoint_dirs(output_dir)
        if existing:
            logger.warning("training.output_dir=%s already holds %s; starting a fresh run there (set "
                           "training.resume_from_checkpoint=auto to continue it)", output_dir, existing[-1].name)
        return None
    if resume == "auto":
        found = newest_complete_checkpoint(output_dir)
        if found is None:
            logger.info("resume_from_checkpoint=auto: no checkpoint in %s, starting fresh", output_dir)
            return None
        logger.info("resume_from_checkpoint=auto: resuming from %s", found)
        _check_files(found)
        return str(found)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"training.resume_from_checkpoint={resume}: no such directory (a checkpoint-N directory "
                          "of an earlier run, or `auto` for the newest one in training.output_dir)")
    if checkpoint_dirs(path) or (path / COMPLETE_FILE).is_file():
        newest = newest_complete_checkpoint(path)
        raise ConfigError(f"training.resume_from_checkpoint={resume} is a run directory, not one of its checkpoints: "
                          + (f"name one, e.g. its newest, {newest}" if newest else "it holds no complete checkpoint"))
    if not is_complete(path):
        raise ConfigError(f"training.resume_from_checkpoint={resume} has no {STATE_FILE}: not a complete "
                          "checkpoint (it was cut off while saving, or is a final run directory)")
    _check_files(path)
    return str(path)


def _check_files(checkpoint: Path) -> None:
    """Every weight and optimizer file of `checkpoint` reads (none cut short): else one line naming it."""
    try:
        check_weight_files(checkpoint, also=RESUME_FILES)
    except UserError as err:
        raise ConfigError(f"cannot resume {checkpoint}: {err}") from None


def publish(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint from staging into place (replacing one of the same step, if any)."""
    if final.exists():
        old = staged.with_name(staged.name + REPLACED_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    with contextlib.suppress(OSError):  # `.staging/` itself, when nothing else is in it
        staged.parent.rmdir()


def mark_finished(output_dir: Path, record: dict) -> None:
    (output_dir / COMPLETE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def clear_finished(output_dir: Path) -> None:
    (output_dir / COMPLETE_FILE).unlink(missing_ok=True)
