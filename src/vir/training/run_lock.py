"""One process trains into an output directory at a time.

    with run_dir_lock(Path(cfg.training.output_dir)):   # the main process of a run; the others do not lock
        ...train...

The lock is `<output_dir>/.vir-train.lock`, a file holding the owner's pid, host, start time and command,
held with `flock` while the owner lives: the kernel releases it when the process dies however it dies (kill -9,
the OOM killer), so a lock file left by a dead process is taken over (and said so) rather than refused. A
second `vir-train` on a directory in use stops at once with one line naming the directory and the process.
On a filesystem without `flock` the pid and host decide: a lock of a dead pid on this host is stale, one from
another host is respected. The same process may take the lock again (a recipe locks its run directory, then
each stage its own); it is released when the outermost holder leaves.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Dict, Iterator, Optional

from vir.utils.errors import UserError
from vir.utils.paths import made_directories

logger = logging.getLogger(__name__)

LOCK_FILE = ".vir-train.lock"


class RunDirBusyError(UserError):
    """Another live process trains into this output directory."""


_held: Dict[Path, list] = {}  # resolved directory -> [open file descriptor, depth]


@contextmanager
def run_dir_lock(output_dir: Path, key: str = "training.output_dir") -> Iterator[None]:
    """Hold the output directory's lock for the duration (see module doc); directories it had to create are
    removed again on leaving when they are still empty (a run refused by a later check writes nothing)."""
    directory = output_dir.absolute()
    resolved = directory.resolve()
    if resolved in _held:
        _held[resolved][1] += 1
        try:
            yield
        finally:
            _held[resolved][1] -= 1
        return
    with made_directories(directory):
        fd = _acquire(directory / LOCK_FILE, key)
        _held[resolved] = [fd, 1]
        try:
            yield
        finally:
            del _held[resolved]
            with suppress(OSError):
                (directory / LOCK_FILE).unlink()  # before unlocking: a waiter then finds a fresh file
            os.close(fd)


def _acquire(path: Path, key: str) -> int:
    """Open, lock and fill `path`; returns its descriptor. Raises `RunDirBusyError` naming the holder."""
    for _ in range(5):  # the holder may unlink the file between our open and our lock: then retry
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirBusyError(_busy_message(path, key, previous)) from None
        except OSError as err:  # no flock on this filesystem (some network mounts)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            if previous and _alive_elsewhere(previous):
                os.close(fd)
                raise RunDirBusyError(_busy_message(path, key, previous) + " (this file system has no locks: if that "
                                      f"process no longer runs, delete {path})") from None
        if not _same_file(fd, path):
            os.close(fd)
            continue
        if previous and previous.get("pid") != os.getpid():
            logger.warning("%s: taking over a stale lock of pid %s on %s (started %s), which is no longer running",
                           path.parent, previous.get("pid"), previous.get("host"), previous.get("started"))
        _write_holder(fd)
        return fd
    raise RunDirBusyError(f"{key}={path.parent}: its lock {path} keeps changing hands; is another vir-train starting "
                          "there?")


def _busy_message(path: Path, key: str, holder: Optional[dict]) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}: "
           f"{holder.get('command', '')}".rstrip(": ") if holder else "another process")
    return (f"{key}={path.parent} is in use by another training run ({who}); wait for it to end, or choose "
            f"another {key}")


def _read_holder(fd: int) -> Optional[dict]:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", errors="replace")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?"}


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)[:500]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _alive_elsewhere(holder: dict) -> bool:
    """Without flock: whether the recorded holder may still run (always, on another host: we cannot look)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid")), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return True

