"""One process trains into an output directory at a time (training.run_lock): a live holder is named and refused,
a dead one's lock is taken over and said so, the same process may lock again, and nothing is left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from vir.training.run_lock import LOCK_FILE, RunDirBusyError, run_dir_lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vir.training.run_lock import run_dir_lock
    with run_dir_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of `tmp_path / "run"` (killed afterwards)."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    yield run_dir, process
    process.kill()
    process.wait()


def test_a_second_process_is_refused_naming_the_holder(holder):
    run_dir, process = holder
    with pytest.raises(RunDirBusyError) as err:
        with run_dir_lock(run_dir):
            pytest.fail("took a lock another live process holds")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert f"training.output_dir={run_dir} is in use by another training run" in message
    assert f"pid {process.pid} on {socket.gethostname()}" in message
    assert (run_dir / LOCK_FILE).is_file()  # the holder's lock is untouched
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == process.pid


def test_the_lock_of_a_killed_process_is_taken_over_and_said_so(holder, caplog):
    run_dir, process = holder
    process.kill()  # kill -9: it never released anything; its lock file stays
    process.wait()
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == process.pid
    with run_dir_lock(run_dir):
        assert f"taking over a stale lock of pid {process.pid}" in caplog.text
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK_FILE).exists()


def test_the_same_process_may_lock_again_and_releases_with_the_outermost(tmp_path):
    run_dir = tmp_path / "run"
    with run_dir_lock(run_dir):
        with run_dir_lock(run_dir):  # a recipe's run directory, then its stage inside it
            pass
        assert (run_dir / LOCK_FILE).is_file()
    assert not (run_dir / LOCK_FILE).exists()


def test_directories_the_lock_created_are_removed_when_nothing_was_written(tmp_path):
    with run_dir_lock(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / LOCK_FILE).is_file()
    assert list(tmp_path.iterdir()) == []  # a run refused after taking the lock writes nothing
    with run_dir_lock(tmp_path / "c"):
        (tmp_path / "c" / "checkpoint-1").mkdir()
    assert (tmp_path / "c" / "checkpoint-1").is_dir()  # what a run wrote stays
