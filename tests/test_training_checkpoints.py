"""Checkpoint bookkeeping (training.checkpoints): which checkpoint `auto` takes, publishing a staged one, what a
resumed run is told about a changed config."""

from __future__ import annotations

import pytest

from vir.training.checkpoints import (
    STATE_FILE,
    newest_complete_checkpoint,
    publish,
    resume_target,
)
from vir.utils.config import ConfigError


def _checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / STATE_FILE).write_text("{}")
    return path


def test_auto_takes_the_newest_complete_checkpoint_by_step_not_by_name(tmp_path):
    for step in (9, 10, 100):
        _checkpoint(tmp_path, step)
    _checkpoint(tmp_path, 200, complete=False)
    (tmp_path / "checkpoint-300").write_text("a file, not a checkpoint")
    (tmp_path / "checkpoint-final").mkdir()
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-100"
    assert resume_target("auto", tmp_path) == str(tmp_path / "checkpoint-100")
    assert resume_target("auto", tmp_path / "absent") is None
    assert resume_target(None, tmp_path) is None


def test_an_explicit_checkpoint_must_exist_and_be_complete(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint-5: no such directory"):
        resume_target(str(tmp_path / "checkpoint-5"), tmp_path)
    partial = _checkpoint(tmp_path, 7, complete=False)
    with pytest.raises(ConfigError, match=f"has no {STATE_FILE}: not a complete checkpoint"):
        resume_target(str(partial), tmp_path)
    assert resume_target(str(_checkpoint(tmp_path, 8)), tmp_path) == str(tmp_path / "checkpoint-8")


def test_publish_moves_a_staged_checkpoint_into_place_replacing_one_of_the_same_step(tmp_path):
    staged = _checkpoint(tmp_path / ".staging", 4)
    (staged / "new").write_text("new")
    old = _checkpoint(tmp_path, 4)
    (old / "old").write_text("old")
    publish(staged, tmp_path / "checkpoint-4")
    assert sorted(p.name for p in (tmp_path / "checkpoint-4").iterdir()) == ["new", STATE_FILE]
    assert not (tmp_path / ".staging").exists()  # nothing left behind
