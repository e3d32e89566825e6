"""Resuming from `checkpoint-N/` continues the run exactly: weights (projector included), optimizer, state."""

from __future__ import annotations

import json

import pytest
import torch
from training_fixtures import run_config, tiny_bases, train


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _steps(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return state["global_step"], [(row["step"], row["loss"]) for row in state["log_history"] if "loss" in row]


@pytest.mark.parametrize("mode", ["stage2_lora", "stage1"])
def test_resume_continues_to_max_steps_as_if_never_stopped(bases, tmp_path, mode):
    steps = ("training.max_steps=4", "training.save_steps=2")
    straight = train(run_config(bases, tmp_path / "straight", mode, *steps))
    checkpoint = straight.output_dir / "checkpoint-2"
    resumed = train(run_config(bases, tmp_path / "resumed", mode, *steps,
                               f"training.resume_from_checkpoint={checkpoint}"))

    assert resumed.outcome.global_step == 4
    assert sorted(resumed.snapshots) == [4]  # only steps 3-4 ran: the first save after resuming is step 4
    global_step, losses = _steps(resumed.output_dir)
    assert global_step == 4 and [step for step, _ in losses] == [1, 2, 3, 4]  # history continues from 1-2
    assert losses == _steps(straight.output_dir)[1]

    # Same weights (trainable ones, projector included) and the same optimizer moments as the unbroken run.
    trained = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    ours, theirs = resumed.model.state_dict(), straight.model.state_dict()
    assert any("mm_projector" in n for n in trained)
    for name in trained:
        assert torch.equal(ours[name], theirs[name]), name
    opt_ours, opt_theirs = resumed.trainer.optimizer.state_dict(), straight.trainer.optimizer.state_dict()
    assert opt_ours["state"].keys() == opt_theirs["state"].keys()
    for key, state in opt_theirs["state"].items():
        assert int(opt_ours["state"][key]["step"]) == int(state["step"]) == 4
        assert torch.equal(opt_ours["state"][key]["exp_avg_sq"], state["exp_avg_sq"])
    assert ([g["lr"] for g in resumed.trainer.optimizer.param_groups]
            == [g["lr"] for g in straight.trainer.optimizer.param_groups])
