"""A run directory belongs to one run (training.ownership): what makes two configs one run, and what `vir-train`
does with a directory holding this run, another run, or nothing; checked on the decision alone and end to end
on tiny runs (the wrong weights must never come back with exit status 0)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from test_training_run_lock import _HOLDER
from training_fixtures import run_config, run_overrides, tiny_bases, train, trainer_with, vir_train_fails
from transformers import TrainerCallback

from vir.training import run as run_module
from vir.training.checkpoints import COMPLETE_FILE, STATE_FILE
from vir.training.ownership import (
    EFFECTIVE_BATCH_KEY,
    IDENTITY_FILE,
    claim_decision,
    clear_other_run,
    identity_changes,
    record_identity,
    run_identity,
)
from vir.utils.config import ConfigError, compose_config


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


# --- the identity ---------------------------------------------------------------------------------------------

def _identity(*overrides, processes=1):
    return run_identity(compose_config(["model=tiny", *overrides]), processes)


def test_operational_keys_leave_the_identity_alone():
    base = _identity()
    same = _identity("training.output_dir=elsewhere", "training.logging_steps=3", "training.save_steps=7",
                     "training.resume_from_checkpoint=auto", "training.report_to=[]", "data.num_workers=4",
                     "data.test_path=t.json", "training.gradient_checkpointing=true", "training.loss_chunk_size=0")
    assert identity_changes(base, same) == []
    assert "training.output_dir" not in base and "training.logging_steps" not in base


@pytest.mark.parametrize("override", ["data.train_path=other.json", "model.llm.path=/models/other",
                                      "training.mode=stage2_full", "training.lora_r=8", "training.max_steps=6",
                                      "training.learning_rate=0.5", "seed=7", "data.template=plain"])
def test_what_trains_makes_another_run(override):
    key, _, value = override.partition("=")
    changes = identity_changes(_identity(), _identity(override))
    assert len(changes) == 1 and changes[0].startswith(f"{key}: ") and changes[0].endswith(value)


def test_the_samples_per_step_count_not_how_they_are_split_over_processes():
    one = _identity("training.global_batch_size=16", "training.per_device_train_batch_size=16")
    two = _identity("training.global_batch_size=16", "training.per_device_train_batch_size=16", processes=2)
    assert one[EFFECTIVE_BATCH_KEY] == two[EFFECTIVE_BATCH_KEY] == 16 and identity_changes(one, two) == []
    smaller = _identity("training.per_device_train_batch_size=4")  # no global batch: the step takes fewer samples
    assert identity_changes(_identity(), smaller) == [f"{EFFECTIVE_BATCH_KEY}: 8 -> 4"]


# --- the decision, on directories laid out by hand ------------------------------------------------------------

def _checkpoint(run_dir, step, cfg):
    path = run_dir / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text("{}")
    save_file({"lora_A": torch.zeros(2, 2)}, str(path / "adapter_model.safetensors"))
    OmegaConf.save(cfg, path / "vir_config.yaml", resolve=True)
    return path


def _cfg(run_dir, *overrides):
    return compose_config(["model=tiny", f"training.output_dir={run_dir}", *overrides])


def test_an_empty_or_absent_directory_starts_fresh(tmp_path):
    assert claim_decision(_cfg(tmp_path / "new", "training.resume_from_checkpoint=auto"), tmp_path / "new", 1).resume \
        is None


def test_auto_into_another_runs_directory_stops_naming_the_keys_and_the_choices(tmp_path):
    old = _cfg(tmp_path, "training.max_steps=16")
    _checkpoint(tmp_path, 16, old)
    record_identity(tmp_path, run_identity(old, 1))
    for resume in ("auto", "null"):
        with pytest.raises(ConfigError) as err:
            claim_decision(_cfg(tmp_path, "training.max_steps=6", f"training.resume_from_checkpoint={resume}"),
                           tmp_path, 1)
        message = str(err.value)
        assert len(message.splitlines()) == 1
        assert f"training.output_dir={tmp_path} holds another run (training.max_steps: 16 -> 6)" in message
        assert "choose a new training.output_dir" in message and "training.overwrite_output_dir=true" in message
        assert f"training.resume_from_checkpoint={tmp_path / 'checkpoint-16'}" in message


def test_a_run_from_before_identities_is_read_from_its_checkpoint(tmp_path):
    _checkpoint(tmp_path, 4, _cfg(tmp_path, "data.train_path=a.json"))  # no run_identity.json
    with pytest.raises(ConfigError, match=r"holds another run \(data.train_path: \S*/a.json -> \S*/b.json\)"):
        claim_decision(_cfg(tmp_path, "data.train_path=b.json", "training.resume_from_checkpoint=auto"), tmp_path, 1)


def test_overwrite_replaces_another_run_and_an_explicit_checkpoint_continues_it(tmp_path, caplog):
    old = _cfg(tmp_path, "training.max_steps=16")
    checkpoint = _checkpoint(tmp_path, 16, old)
    claim = claim_decision(_cfg(tmp_path, "training.max_steps=32", "training.overwrite_output_dir=true",
                                "training.resume_from_checkpoint=auto"), tmp_path, 1)
    assert claim.replace and claim.resume is None
    claim = claim_decision(_cfg(tmp_path, "training.max_steps=32", f"training.resume_from_checkpoint={checkpoint}"),
                           tmp_path, 1)
    assert claim.resume == str(checkpoint) and not claim.replace
    assert "continues anyway): training.max_steps: 16 -> 32" in caplog.text


def test_a_checkpoint_of_another_directory_cannot_continue_into_a_directory_holding_a_run(tmp_path):
    _checkpoint(tmp_path / "b", 4, _cfg(tmp_path / "b", "data.train_path=b.json"))
    elsewhere = _checkpoint(tmp_path / "a", 4, _cfg(tmp_path / "a", "data.train_path=a.json"))
    with pytest.raises(ConfigError, match="belongs to another directory"):
        claim_decision(_cfg(tmp_path / "b", "data.train_path=a.json", f"training.resume_from_checkpoint={elsewhere}"),
                       tmp_path / "b", 1)


def test_this_runs_finished_directory_is_reported_finished(tmp_path):
    cfg = _cfg(tmp_path, "training.resume_from_checkpoint=auto")
    _checkpoint(tmp_path, 5, cfg)
    record_identity(tmp_path, run_identity(cfg, 1))
    (tmp_path / COMPLETE_FILE).write_text(json.dumps({"global_step": 5}))
    later = _cfg(tmp_path, "training.resume_from_checkpoint=auto", "training.logging_steps=50")
    assert claim_decision(later, tmp_path, 1).finished == {"global_step": 5}


def test_a_recorded_run_that_left_nothing_is_taken_over(tmp_path):
    record_identity(tmp_path, run_identity(_cfg(tmp_path, "seed=1"), 1))  # killed before its first checkpoint
    assert claim_decision(_cfg(tmp_path, "seed=2"), tmp_path, 1).resume is None


def test_paths_are_compared_as_the_files_they_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    typed = _identity("data.train_path=data/train.json", "model.llm.path=bases/llm")
    absolute = _identity(f"data.train_path={tmp_path}/data/train.json", f"model.llm.path={tmp_path}/bases/llm")
    assert identity_changes(typed, absolute) == []
    recorded_as_typed = {"data.train_path": "data/train.json"}  # a record written with the path as typed
    assert identity_changes(recorded_as_typed, absolute) == []


def test_a_model_no_run_wrote_is_never_trained_into(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "vir_export.json").write_text('{"kind": "hf"}')
    for directory in ("base", "export"):
        with pytest.raises(ConfigError, match=f"{directory} holds a model that no vir run wrote"):
            claim_decision(_cfg(tmp_path / directory, "training.overwrite_output_dir=true"), tmp_path / directory, 1)


def test_overwrite_refuses_to_delete_the_new_runs_own_input(tmp_path):
    old = _cfg(tmp_path, "training.max_steps=16")
    checkpoint = _checkpoint(tmp_path, 16, old)
    (tmp_path / "mm_projector.bin").write_text("the old run's projector")
    for projector in (tmp_path / "mm_projector.bin", checkpoint / "mm_projector.bin"):
        with pytest.raises(ConfigError, match=rf"would delete this run's own input \(model.pretrained_projector="
                                              rf"{projector}\)"):
            claim_decision(_cfg(tmp_path, "training.max_steps=30", "training.overwrite_output_dir=true",
                                f"model.pretrained_projector={projector}"), tmp_path, 1)


def test_a_run_directory_is_not_a_checkpoint_and_a_cut_checkpoint_is_named(tmp_path):
    cfg = _cfg(tmp_path)
    _checkpoint(tmp_path, 2, cfg)
    newest = _checkpoint(tmp_path, 3, cfg)
    with pytest.raises(ConfigError, match=rf"resume_from_checkpoint={tmp_path} is a run directory, not one of its "
                                          rf"checkpoints: name one, e.g. its newest, {newest}"):
        claim_decision(_cfg(tmp_path, f"training.resume_from_checkpoint={tmp_path}"), tmp_path, 1)
    torch.save({"state": {}}, newest / "optimizer.pt")
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])  # cut short
    with pytest.raises(ConfigError, match=rf"cannot resume {newest}: {newest / 'optimizer.pt'} is truncated or "
                                          "corrupt"):
        claim_decision(_cfg(tmp_path, "training.resume_from_checkpoint=auto"), tmp_path, 1)


def test_an_unreadable_identity_record_is_one_line(tmp_path):
    (tmp_path / IDENTITY_FILE).write_text('{"identity": {"seed"')
    with pytest.raises(ConfigError, match=f"{IDENTITY_FILE} is unreadable"):
        claim_decision(_cfg(tmp_path), tmp_path, 1)


def test_clearing_another_run_keeps_what_is_not_a_runs(tmp_path):
    _checkpoint(tmp_path, 2, _cfg(tmp_path))
    for name in ("model.safetensors", "model-00001-of-00002.safetensors", "adapter_config.json", "mm_projector.bin",
                 "vir_config.yaml", COMPLETE_FILE, IDENTITY_FILE, "curves.png", "tokenizer.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".staging" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "step-3.png").write_text("x")
    (tmp_path / "data").mkdir()
    clear_other_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "tokenizer.json"]


# --- end to end ------------------------------------------------------------------------------------------------

def _digests(run_dir):
    """Every file of a run directory by content (what must not change when a run is refused)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and "runs" not in p.parts}


def _other_data(bases, tmp_path):
    """The train records less the last eight, under another name: another run's data."""
    records = json.loads(bases.data.train.read_text())[:-8]
    path = tmp_path / "other_train.json"
    path.write_text(json.dumps(records))
    return path


def test_auto_into_a_finished_run_on_other_data_changes_nothing(bases, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    train(run_config(bases, run_dir, "stage2_lora", "training.max_steps=2", "training.save_steps=1"))
    before = _digests(run_dir)
    other = _other_data(bases, tmp_path)
    err = vir_train_fails(monkeypatch, capsys, run_overrides(
        bases, run_dir, "stage2_lora", "training.max_steps=2", "training.save_steps=1",
        f"data.train_path={other}", "training.resume_from_checkpoint=auto"))
    assert f"holds another run (data.train_path: {bases.data.train} -> {other})" in err
    err = vir_train_fails(monkeypatch, capsys, run_overrides(  # a bad value is named as such, not as another run
        bases, run_dir, "stage2_lora", "training.max_steps=2", "training.save_steps=1", "training.num_train_epochs=nan",
        "training.resume_from_checkpoint=auto"))
    assert "training.num_train_epochs=nan must be a finite number" in err
    assert _digests(run_dir) == before  # weights, configs and completion record: still the first run's


class _Killed(Exception):
    """Stands for a kill -9 at a chosen moment."""


def _kill_after_checkpoint(step):
    class KillAfter(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Killed(f"killed after checkpoint-{step}")

    return trainer_with(KillAfter())


def _trained(run_dir):
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return state["global_step"], [row["loss"] for row in state["log_history"] if "loss" in row]


def _adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


def test_a_shorter_run_never_resumes_another_runs_checkpoint(bases, tmp_path, monkeypatch, capsys):
    steps = ("training.save_steps=1", "training.resume_from_checkpoint=auto")
    run_dir = tmp_path / "run"
    train(run_config(bases, run_dir, "stage2_lora", "training.max_steps=4", *steps))  # the run already there
    err = vir_train_fails(monkeypatch, capsys,
                           run_overrides(bases, run_dir, "stage2_lora", "training.max_steps=2", *steps))
    assert "holds another run (training.max_steps: 4 -> 2)" in err

    # Replaced on purpose, killed after its own checkpoint-1, re-run with the very same command (a requeued job):
    replace = (*steps, "training.overwrite_output_dir=true")
    with monkeypatch.context() as patch:
        patch.setattr(run_module, "LlavaTrainer", _kill_after_checkpoint(1))
        with pytest.raises(_Killed):
            run_module.run_training(run_config(bases, run_dir, "stage2_lora", "training.max_steps=2", *replace))
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1"]  # the other run's are gone
    resumed = train(run_config(bases, run_dir, "stage2_lora", "training.max_steps=2", *replace))
    assert resumed.outcome.global_step == 2 and sorted(resumed.snapshots) == [2]  # resumed its own checkpoint-1

    straight = train(run_config(bases, tmp_path / "straight", "stage2_lora", "training.max_steps=2", *steps))
    assert _trained(run_dir)[1] == _trained(straight.output_dir)[1]
    ours, theirs = _adapter(run_dir), _adapter(straight.output_dir)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_run_killed_after_its_last_checkpoint_finishes_without_another_step(bases, tmp_path, monkeypatch):
    # 3 steps of an epoch of 5: the Trainer alone would take a 4th step when resuming from checkpoint-3.
    args = ("training.max_steps=3", "training.save_steps=1", "training.resume_from_checkpoint=auto")
    straight = train(run_config(bases, tmp_path / "straight", "stage2_lora", *args))
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        def killed(*_args, **_kwargs):
            raise _Killed("killed before the completion record")

        patch.setattr(run_module, "mark_finished", killed)
        with pytest.raises(_Killed):
            train(run_config(bases, run_dir, "stage2_lora", *args))
    assert not (run_dir / COMPLETE_FILE).exists()

    finished = train(run_config(bases, run_dir, "stage2_lora", *args))
    assert finished.outcome.global_step == 3 and finished.snapshots == {}  # no step, no new checkpoint
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    stats, expected = (json.loads((d / "data_stats.json").read_text()) for d in (run_dir, straight.output_dir))
    assert stats["samples_trained"] == expected["samples_trained"] == 24
    assert json.loads((run_dir / COMPLETE_FILE).read_text())["global_step"] == 3
    assert finished.outcome.train_loss == pytest.approx(sum(_trained(run_dir)[1]) / 3)
    ours, theirs = _adapter(run_dir), _adapter(straight.output_dir)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    again = run_module.run_training(run_config(bases, run_dir, "stage2_lora", *args))  # now reported finished
    assert again.global_step == 3 and again.train_loss == finished.outcome.train_loss


def test_a_second_vir_train_on_a_directory_in_use_stops_at_once(bases, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = vir_train_fails(monkeypatch, capsys, run_overrides(bases, run_dir, "stage2_lora"))
        assert f"training.output_dir={run_dir} is in use by another training run (pid {holder.pid} on" in err
    finally:
        holder.kill()
        holder.wait()
    assert not list(run_dir.glob("checkpoint-*"))
    shutil.rmtree(run_dir)
