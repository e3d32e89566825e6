"""Every file `vir` reads that could hold a pickle is read without running code: a pickle whose unpickling would
create a file is refused by each loader, and the file is never created."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from training_fixtures import run_config, tiny_bases, train

from vir.data.accounting import LEDGER_FILE, RecordLedger
from vir.models.builder import build_all
from vir.models.projector import load_projector_file
from vir.utils.errors import UserError


class Payload:
    """Unpickling this calls `open(marker, "w")`: code execution, as a real attack would use `os.system`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _evil(path, marker, tensors=None):
    torch.save({**(tensors or {}), "payload": Payload(marker)}, path)


def test_a_projector_file_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _evil(tmp_path / "mm_projector.bin", marker, {"model.mm_projector.0.weight": torch.zeros(2, 2)})
    with pytest.raises(UserError, match=r"mm_projector.bin: refused: it holds Python objects besides tensors"):
        load_projector_file(tmp_path / "mm_projector.bin")
    assert not marker.exists()


def test_an_llm_checkpoint_that_runs_code_is_refused(bases, tmp_path):
    marker = tmp_path / "pwned"
    llm = tmp_path / "llm"
    shutil.copytree(bases.llm, llm)
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(llm / "model.safetensors"))
    (llm / "model.safetensors").unlink()
    _evil(llm / "pytorch_model.bin", marker, state)
    with pytest.raises(Exception) as raised:
        build_all(run_config(bases, tmp_path / "run", "stage2_lora", f"model.llm.path={llm}"))
    assert "weights_only" in str(raised.value) or "Unpickl" in type(raised.value).__name__ + str(raised.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_a_checkpoint_that_runs_code_is_refused_on_resume(bases, tmp_path, name):
    marker = tmp_path / "pwned"
    run = train(run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=2", "training.save_steps=1"))
    checkpoint = run.output_dir / "checkpoint-1"
    _evil(checkpoint / name, marker)
    with pytest.raises(Exception) as raised:
        train(run_config(bases, tmp_path / "resumed", "stage2_lora", "training.max_steps=2",
                         f"training.resume_from_checkpoint={checkpoint}"))
    assert "weights_only" in str(raised.value) or "Unpickl" in str(raised.value), raised.value
    assert not marker.exists()


def test_a_data_ledger_with_a_pickle_is_refused(tmp_path):
    np.save(tmp_path / LEDGER_FILE, np.array([Payload(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        RecordLedger(3).load(tmp_path / LEDGER_FILE)
    assert not (tmp_path / "pwned").exists()
