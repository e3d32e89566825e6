"""Failures during training: non-finite losses are skipped and then stop the run; a checkpoint that cannot be
written (out of disk) stops it with the previous checkpoint intact. Either way, a clear one-line error."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from training_fixtures import run_config, tiny_bases, train

from vir.training.checkpoints import STAGING_DIR, is_complete
from vir.training.trainer import CheckpointWriteError, LlavaTrainer, NonFiniteTrainingError


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _nan_on(monkeypatch, steps):
    """The loss is NaN while the trainer is at one of `steps` (1-based optimizer steps)."""
    real = LlavaTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)  # training asks for the loss alone
        return loss * float("nan") if self.state.global_step + 1 in steps else loss

    monkeypatch.setattr(LlavaTrainer, "compute_loss", compute_loss)


def test_a_nonfinite_step_is_skipped_and_training_goes_on(bases, tmp_path, monkeypatch, caplog):
    _nan_on(monkeypatch, {2, 3})
    run = train(run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=5", "training.save_steps=1"))
    assert run.outcome.global_step == 5
    assert "step 2: non-finite gradients" in caplog.text and "step 3: non-finite gradients" in caplog.text
    trained = [n for n, p in run.model.named_parameters() if p.requires_grad]
    after = {step: run.snapshots[step] for step in (1, 2, 3, 4)}
    for name in trained:  # steps 2 and 3 changed no weight; 4 did
        assert torch.equal(after[1][name], after[2][name]) and torch.equal(after[2][name], after[3][name]), name
    assert any(not torch.equal(after[3][n], after[4][n]) for n in trained)
    assert all(torch.isfinite(t).all() for t in run.model.state_dict().values())
    assert run.trainer.nonfinite_total == 2


def test_too_many_nonfinite_steps_stop_the_run_with_its_checkpoints_intact(bases, tmp_path, monkeypatch):
    _nan_on(monkeypatch, set(range(3, 100)))
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=20", "training.save_steps=2",
                     "training.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 5: 3 optimizer steps in a row .*"
                                                     r"max_nonfinite_steps=2"):
        train(cfg)
    checkpoints = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"]  # 4 was saved after two skipped steps, weights finite
    assert all(is_complete(tmp_path / "run" / name) for name in checkpoints)
    assert not (tmp_path / "run" / "training_complete.json").exists()


def test_out_of_disk_while_saving_leaves_the_previous_checkpoint_whole(bases, tmp_path, monkeypatch):
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=6", "training.save_steps=2")
    with pytest.raises(CheckpointWriteError, match=r"cannot write checkpoint-4 .*No space left on device.*"
                                                   r"checkpoint-2 is intact.*resume_from_checkpoint=auto"):
        train(cfg)
    run_dir = tmp_path / "run"
    assert calls["n"] == 1 and sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert is_complete(run_dir / "checkpoint-2") and not (run_dir / STAGING_DIR).exists()
    assert json.loads((run_dir / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same run resumes from checkpoint-2
    resumed = train(run_config(bases, run_dir, "stage2_lora", "training.max_steps=6", "training.save_steps=2",
                               "training.resume_from_checkpoint=auto"))
    assert resumed.outcome.global_step == 6 and sorted(resumed.snapshots) == [4, 6]



def test_the_guard_reads_gradients_of_mixed_dtypes(bases, tmp_path):
    """bf16 LoRA weights beside the fp32 projector (a bf16 run): the finiteness check must not trip over dtypes."""
    run = train(run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=1"))
    lora, projector = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([lora, projector], lr=1.0)
    lora.grad, projector.grad = torch.ones(3, dtype=torch.bfloat16), torch.ones(2)
    run.trainer.nonfinite_streak = 0
    run.trainer._finite_step(optimizer)()
    assert run.trainer.nonfinite_streak == 0 and float(lora[0]) == 0.0  # finite: the step ran
    projector.grad[0] = float("nan")
    run.trainer._finite_step(optimizer)()
    assert run.trainer.nonfinite_streak == 1 and float(lora[0]) == 0.0  # skipped
