"""Out of disk for real (a small tmpfs filled mid-run): whichever library's write fails (safetensors for an adapter,
torch's zip writer for a projector), `vir-train` ends with one line naming what could not be written and the
intact previous checkpoint, exit status 2, no staging left; freed, the same command resumes and finishes."""

from __future__ import annotations

import errno
import subprocess

import pytest
from training_fixtures import run_overrides, tiny_bases, trainer_with, vir_train
from transformers import TrainerCallback

from vir.training import run as run_module
from vir.training.checkpoints import COMPLETE_FILE, STAGING_DIR, final_weight_files

FILLER = "filler"


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs at tmp_path / "disk" (root and a kernel that allows it; otherwise the test skips)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip() or 'mount failed'}): needs root and "
                    "CAP_SYS_ADMIN")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk):
    """Write a filler file until the disk has no byte left (unbuffered: each write succeeds whole or fails)."""
    with open(disk / FILLER, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC


def _filling_trainer(disk, at_step, event="on_save"):
    """LlavaTrainer that fills `disk` at `event` of step `at_step` (after the run's own callbacks)."""
    class FillDisk(TrainerCallback):
        def fill(self, args, state, control, **kwargs):
            if state.global_step == at_step:
                _fill(disk)

    setattr(FillDisk, event, FillDisk.fill)
    return trainer_with(FillDisk())


def _last_line(err):
    """stderr's last line, less a progress bar the failure cut short (it ends in a carriage return, no newline)."""
    last = err.strip().splitlines()[-1]
    return "vir-train: " + last.split("vir-train: ", 1)[1] if "vir-train: " in last else last


@pytest.mark.parametrize("mode", ["stage2_lora", "stage1"])  # safetensors' writer fails first; torch's
def test_out_of_disk_mid_run_is_one_line_and_the_run_resumes(mode, bases, small_disk, monkeypatch, capsys):
    run_dir = small_disk / "run"
    overrides = run_overrides(bases, run_dir, mode, "training.max_steps=3", "training.save_steps=1",
                              "training.resume_from_checkpoint=auto")
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "LlavaTrainer", _filling_trainer(small_disk, at_step=1))
        code, err = vir_train(patch, capsys, overrides)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert _last_line(err) == (f"vir-train: cannot write checkpoint-2 into {run_dir} (No space left on device); "
                               "checkpoint-1 is intact: free space and re-run with "
                               "training.resume_from_checkpoint=auto")
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not (run_dir / STAGING_DIR).exists()

    (small_disk / FILLER).unlink()
    code, err = vir_train(monkeypatch, capsys, overrides)
    assert code == 0, err[-3000:]
    assert (run_dir / COMPLETE_FILE).is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("event, what", [("on_save", "the run's records"), ("on_train_end", "the final weights")])
def test_out_of_disk_at_the_end_leaves_no_weights_and_resuming_finishes(event, what, bases, small_disk, monkeypatch,
                                                                        capsys):
    run_dir = small_disk / "run"
    overrides = run_overrides(bases, run_dir, "stage2_lora", "training.max_steps=2", "training.save_steps=1",
                              "training.resume_from_checkpoint=auto")
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "LlavaTrainer", _filling_trainer(small_disk, at_step=2, event=event))
        code, err = vir_train(patch, capsys, overrides)
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert _last_line(err) == (
        f"vir-train: cannot write {what} into {run_dir} (No space left on device); checkpoint-2 is "
        "intact: free space and re-run with training.resume_from_checkpoint=auto")
    assert final_weight_files(run_dir) == [] and not (run_dir / COMPLETE_FILE).exists()

    (small_disk / FILLER).unlink()
    code, err = vir_train(monkeypatch, capsys, overrides)
    assert code == 0, err[-3000:]
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / COMPLETE_FILE).is_file()
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
