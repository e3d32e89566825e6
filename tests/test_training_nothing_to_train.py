"""A run with nothing to train stops before any model loads, with one line naming the file, and writes nothing:
an empty file, an empty list, only invalid records, or only records too long for model.model_max_length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from training_fixtures import run_config, tiny_bases

from vir.data.records import DataFileError
from vir.training import run as run_module
from vir.training.run import run_training


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def _record(i, question="<image>\nWhat is this?", answer="A shape."):
    return {"id": f"r{i}", "image": "images/train_000000.png",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


CASES = {  # the file's text, the message, model.model_max_length
    "empty_file": ("", "nothing to train on (0 records, 0 invalid)", 512),
    "empty_list": ("[]", "nothing to train on (0 records, 0 invalid)", 512),
    "all_invalid": (json.dumps([{"id": "a", "conversations": []}, {"id": "b"}]), "2 invalid: a: ", 512),
    # 16 image tokens never fit in 10: each sample would have to cut through its image
    "all_too_long": (json.dumps([_record(i) for i in range(3)]),
                     "none of the first 3 records can be trained at model.model_max_length=10", 10),
}


@pytest.mark.parametrize("case", CASES)
def test_nothing_to_train_fails_before_the_model_loads_and_writes_nothing(bases, tmp_path, monkeypatch, case):
    text, message, max_length = CASES[case]
    data = tmp_path / "train.json"
    data.write_text(text)
    out = tmp_path / "run"
    cfg = run_config(bases, out, "stage2_lora", f"data.train_path={data}", f"data.image_folder={bases.data.root}",
                     f"model.model_max_length={max_length}")
    monkeypatch.setattr(run_module, "build_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(DataFileError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        run_training(cfg)
    assert str(data) in str(err.value) and "data.train_path=" in str(err.value)
    assert not out.exists()


def test_vir_train_says_it_in_one_line_with_exit_status_2(bases, tmp_path):
    data = tmp_path / "train.json"
    data.write_text("[]")
    args = ["model=tiny", f"model.llm.path={bases.llm}", f"model.vision_tower.path={bases.clip}",
            f"data.train_path={data}", f"training.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run([str(Path(sys.executable).parent / "vir-train"), *args], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vir-train") or "Traceback" in line]
    assert len(errors) == 1 and "nothing to train on" in errors[0]
    assert not (tmp_path / "run").exists()


def test_data_stats_name_every_excluded_record(bases, tmp_path):
    records = [_record(0), {"id": "no_turns", "conversations": []},
               {"id": "gpt_first", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", f"data.train_path={data}",
                     f"data.image_folder={bases.data.root}", "training.max_steps=1", "training.per_device_train_batch_size=1")
    outcome = run_training(cfg)
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats == outcome.data_stats and stats["records"] == 3
    assert [row["id"] for row in stats["invalid_records"]] == ["no_turns", "gpt_first"]
    assert "the first non-system turn (turn 0) is assistant" in stats["invalid_records"][1]["reason"]


def test_a_directory_as_the_data_file_says_so(bases, tmp_path):
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", f"data.train_path={tmp_path}")
    with pytest.raises(DataFileError, match=r"data.train_path=.* is a directory"):
        run_training(cfg)
