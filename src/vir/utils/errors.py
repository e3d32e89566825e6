"""The base of errors a user's input causes (a config, a data file, a record, a base directory): the console
scripts print their message and exit 2 instead of a traceback (`vir.utils.config.cli_entry`); and the one reading
of a failed write (out of disk, quota, a vanished mount) whatever library did the writing."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Optional, Union

# An OSError with one of these says the storage refused a write, whatever was being done.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
# What torch's zip writer (`torch.save`) raises when the OS refuses a write: the OS error itself is lost.
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")
_SAFETENSORS_IO = "I/O error: "


class UserError(ValueError):
    """Something the user wrote or pointed at is wrong; the message names the key, path or record, and what
    to do."""


def write_failure(err: BaseException, where: Union[str, Path, None] = None, storage_only: bool = False
                  ) -> Optional[str]:
    """Why a save failed, in words, when `err` is a failed write; None for any other error (a bug: re-raise it).

    `OSError` (Python's own writes, shutil), safetensors' `SafetensorError` ("I/O error: No space left on
    device") and torch's `RuntimeError` from its zip writer ("[enforce fail at inline_container.cc] unexpected
    pos"), whose text does not say why: then the free space at `where` tells a full disk apart. With
    `storage_only` (code that also reads: an OSError there may be a corrupt input), only an `OSError` saying
    the storage is full, over quota or read-only counts.
    """
    if isinstance(err, OSError):
        if storage_only and err.errno not in STORAGE_ERRNOS:
            return None
        return err.strerror or str(err)
    text = str(err)
    if type(err).__name__ == "SafetensorError" and _SAFETENSORS_IO in text:
        return text.split(_SAFETENSORS_IO, 1)[1].split(" (os error")[0].strip()
    if isinstance(err, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILURES):
        if where is not None and _free_bytes(Path(where)) < 1 << 20:
            return "No space left on device"
        return f"the write failed ({text.splitlines()[0][:120]})"
    return None


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return 1 << 62
    return 1 << 62
