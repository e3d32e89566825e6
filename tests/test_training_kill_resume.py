"""SIGKILL a `vir-train` process mid-run, re-run the same command with `resume_from_checkpoint=auto`: every later
step's loss equals an uninterrupted run's, and a finished run re-run trains nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from training_fixtures import run_overrides, tiny_bases

STEPS, SAVE_EVERY, KILL_AFTER = 120, 10, 30


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _command(bases, output_dir: Path) -> list[str]:
    overrides = run_overrides(bases, output_dir, "stage2_lora", f"training.max_steps={STEPS}",
                              f"training.save_steps={SAVE_EVERY}", "training.save_total_limit=2",
                              "training.resume_from_checkpoint=auto")
    return [sys.executable, "-m", "vir.cli.train", *overrides]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {row["step"]: row["loss"] for row in state["log_history"] if "loss" in row}


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_killed_run_resumes_to_the_uninterrupted_runs_losses(bases, tmp_path):
    straight = tmp_path / "straight"
    _run(_command(bases, straight))

    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(bases, killed), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / f"checkpoint-{KILL_AFTER}").is_dir():
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "training_complete.json").exists()
    saved = sorted(int(p.name.split("-")[1]) for p in killed.glob("checkpoint-*"))
    assert KILL_AFTER in saved and max(saved) < STEPS

    resumed = _run(_command(bases, killed))
    newest = f"checkpoint-{max(saved)}"
    assert f"resume_from_checkpoint=auto: resuming from {killed / newest}" in resumed.stderr

    ours, theirs = _losses(killed), _losses(straight)
    assert sorted(ours) == list(range(1, STEPS + 1))
    assert ours == theirs  # every step, those trained after the kill included
    # What trained, per record, counts the steps before the kill too (the checkpoint carries the ledger).
    stats = json.loads((killed / "data_stats.json").read_text())
    assert stats == json.loads((straight / "data_stats.json").read_text()) and stats["samples_trained"] == STEPS * 8
    assert not (killed / ".staging").exists() or not any((killed / ".staging").iterdir())
    assert len(list(killed.glob("checkpoint-*"))) == 2  # save_total_limit

    again = _run(_command(bases, killed))
    assert "already finished this run" in again.stderr
    assert _losses(killed) == theirs


def test_auto_starts_fresh_without_a_checkpoint_and_skips_a_cut_off_one(bases, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-99").mkdir(parents=True)  # cut off while saving (no trainer_state.json)
    (run_dir / ".staging" / "checkpoint-7").mkdir(parents=True)
    done = _run(_command(bases, run_dir)[:-1] + ["training.resume_from_checkpoint=auto", "training.max_steps=3"])
    assert "checkpoint-99 has no trainer_state.json" in done.stderr
    assert f"no checkpoint in {run_dir}, starting fresh" in done.stderr
    assert sorted(_losses(run_dir)) == [1, 2, 3]
