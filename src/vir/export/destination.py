"""Where an export lands: checked before any weight loads, then written whole or not at all.

Every export (`vir-export` in both formats, `vir-merge`) writes `vir_export.json` beside its files: which kind
it is, the run it came from and when. An export goes into a new or empty directory, or over an earlier export
of the same kind when the user asks (`overwrite`); never into the run it comes from, nor around it.

It is written into a hidden staging directory beside the output (`.OUT.partial-<pid>`, same file system) and
renamed into place once complete (`vir.training.checkpoints.publish`: the earlier export is moved aside, the
new one renamed in, the earlier one removed). A failed export removes its staging directory; a killed one
leaves at most that hidden directory, never a half-written or mixed OUT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

from vir.models.checkpoint import RUN_CONFIG_FILE
from vir.training.checkpoints import COMPLETE_FILE, REPLACED_SUFFIX, STATE_FILE, publish
from vir.training.preflight import check_output_dir
from vir.utils.errors import UserError, write_failure
from vir.utils.paths import PathLike

logger = logging.getLogger(__name__)

EXPORT_MARKER = "vir_export.json"
# kind -> what the user ran to make it (the kinds never replace one another).
KINDS = {"hf": "vir-export --format hf", "llava": "vir-export --format llava", "merge": "vir-merge"}


class DestinationError(UserError):
    """The output directory cannot take this export (or could not be written); nothing was written there."""


def run_directories(run_dir: PathLike) -> list[Path]:
    """The directories an export of `run_dir` must stay out of (resolved): `run_dir` itself and, when it is a
    `checkpoint-N/` (a Trainer checkpoint of a run that has not ended, or a folder inside a run directory), the
    run directory that holds it."""
    source = Path(run_dir).resolve()
    checkpoint = (source / STATE_FILE).is_file() and not (source / COMPLETE_FILE).is_file()
    if checkpoint or (source.parent / RUN_CONFIG_FILE).is_file():
        return [source, source.parent]
    return [source]


def check_destination(run_dir: PathLike, out_dir: PathLike, kind: str, overwrite: bool = False) -> None:
    """Raise `DestinationError` unless `out_dir` may receive a `kind` export of `run_dir` (see module doc).
    Writes nothing."""
    out = Path(out_dir)
    target = out.resolve()
    runs = run_directories(run_dir)
    for protected in runs:
        if target.is_relative_to(protected):
            where = "is" if target == protected else "lies inside"
            raise DestinationError(f"the output directory {out} {where} the run {protected}, whose files the export "
                                   "would overwrite: choose a directory outside the run")
    if runs[0].is_relative_to(target):
        raise DestinationError(f"the run {runs[0]} lies inside the output directory {out}, which an export replaces "
                               "whole: choose a directory outside the run")
    try:  # a file, a path under a file, a system directory (/proc): said now, before any weight loads
        check_output_dir(str(out), key="OUT_DIR")
    except UserError as err:
        raise DestinationError(str(err)) from None
    if not out.is_dir() or not any(out.iterdir()):
        return
    earlier = _read_marker(out)
    if earlier is None:
        raise DestinationError(f"the output directory {out} is not empty and holds no export of vir (no "
                               f"{EXPORT_MARKER}): choose a new or empty directory, or remove it first; nothing "
                               "was written")
    if earlier.get("kind") != kind:
        found = KINDS.get(earlier.get("kind"), "another kind of export")
        raise DestinationError(f"the output directory {out} holds the output of {found}, not of {KINDS[kind]}: "
                               "choose another directory; nothing was written")
    if not overwrite:
        raise DestinationError(f"the output directory {out} holds an earlier export (of {earlier.get('source')}, "
                               f"{earlier.get('date')}): pass --overwrite to replace it, or choose another directory")


@contextlib.contextmanager
def staged_export(run_dir: PathLike, out_dir: PathLike, kind: str) -> Iterator[Path]:
    """Yield a staging directory to write the export into; on success mark it (`vir_export.json`) and swap it
    into `out_dir`. On any failure the staging directory is removed and `out_dir` is as it was; a failed write
    (a full disk, a quota) becomes a one-line `DestinationError` naming `out_dir` and the reason."""
    out = Path(out_dir)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    _warn_leftovers(out, staging)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        yield staging
        _write_marker(staging, run_dir, kind)
        publish(staging, out)
    except BaseException as err:
        reason = write_failure(err, out.parent) if isinstance(err, Exception) else None
        shutil.rmtree(staging, ignore_errors=True)
        if reason is None:
            raise
        kept = "; the earlier export there is unchanged" if (out / EXPORT_MARKER).is_file() else ""
        raise DestinationError(f"could not write {out}: {reason}. Nothing was written there{kept}; free space "
                               "(or choose another directory) and run again") from err


def _read_marker(out: Path) -> Optional[dict]:
    try:
        marker = json.loads((out / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _write_marker(staging: Path, run_dir: PathLike, kind: str) -> None:
    marker = {"kind": kind, "written_by": KINDS[kind], "source": str(Path(run_dir).resolve()),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (staging / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _warn_leftovers(out: Path, staging: Path) -> None:
    """Name what killed exports into `out` left behind: staging directories (no usable export: safe to delete)
    and an earlier export a kill during the swap left moved aside (`publish`'s `.replaced`: the only copy)."""
    if not out.parent.is_dir():
        return
    found = [p for p in out.parent.glob(f".{out.name}.partial-*") if p != staging]
    moved_aside = [str(p) for p in found if p.name.endswith(REPLACED_SUFFIX)]
    leftovers = [str(p) for p in found if not p.name.endswith(REPLACED_SUFFIX)]
    if leftovers:
        logger.warning("left by an interrupted export into %s, safe to delete: %s", out, ", ".join(leftovers))
    if moved_aside:
        logger.warning("an earlier export of %s, moved aside by an interrupted swap (its only copy: move it back to %s "
                       "if %s is absent): %s", out, out, out, ", ".join(moved_aside))
