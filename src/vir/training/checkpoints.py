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

from omegaconf import DictConfig, OmegaConf

from vir.utils.config import ConfigError

logger = logging.getLogger(__name__)

STAGING_DIR = ".staging"
COMPLETE_FILE = "training_complete.json"
STATE_FILE = "trainer_state.json"  # the Trainer writes it last into a checkpoint
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_RESUME_KEY = "resume_from_checkpoint"


def checkpoint_dirs(output_dir: Path) -> List[Path]:
    """Every `checkpoint-N` directory in `output_dir`, oldest step first (complete or not)."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


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
        return str(found)
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"training.resume_from_checkpoint={resume}: no such directory (a checkpoint-N directory "
                          "of an earlier run, or `auto` for the newest one in training.output_dir)")
    if not is_complete(path):
        raise ConfigError(f"training.resume_from_checkpoint={resume} has no {STATE_FILE}: not a complete "
                          "checkpoint (it was cut off while saving, or is a final run directory)")
    return str(path)


def publish(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint from staging into place (replacing one of the same step, if any)."""
    if final.exists():
        old = staged.with_name(staged.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    with contextlib.suppress(OSError):  # `.staging/` itself, when nothing else is in it
        staged.parent.rmdir()


def _comparable(cfg: DictConfig | dict) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    container.get("training", {}).pop(_RESUME_KEY, None)
    return container


def config_changes(saved: Path, cfg: DictConfig) -> List[str]:
    """`key: old -> new` for every leaf where the config saved at `saved` differs from `cfg`."""
    old, new = _flat(_comparable(OmegaConf.load(saved))), _flat(_comparable(cfg))
    return [f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def finished_run(output_dir: Path, cfg: DictConfig, config_file: str) -> Optional[dict]:
    """The completion record of a run that already ended in `output_dir` with this very config, else None."""
    marker, saved = output_dir / COMPLETE_FILE, output_dir / config_file
    if not (marker.is_file() and saved.is_file()):
        return None
    if _comparable(OmegaConf.load(saved)) != _comparable(cfg):
        logger.info("%s holds a finished run with another config: training again", output_dir)
        return None
    return json.loads(marker.read_text())


def mark_finished(output_dir: Path, record: dict) -> None:
    (output_dir / COMPLETE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def clear_finished(output_dir: Path) -> None:
    (output_dir / COMPLETE_FILE).unlink(missing_ok=True)
