"""Directories made for a while: what a check or a lock creates is gone again when nothing was written there."""

from __future__ import annotations

from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, Path]  # what every function taking a file or directory accepts


@contextmanager
def made_directories(path: Path) -> Iterator[Path]:
    """`path`, created with its missing parents, for the duration; on leaving, each directory this created is
    removed again, deepest first, when it is still empty (what was written there stays, and so does its
    directory). Also when creating it fails half-way."""
    created = [d for d in (path, *path.parents) if not d.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        yield path
    finally:
        for directory in created:
            with suppress(OSError):  # not empty (or gone): it stays
                directory.rmdir()
