"""The bad-data corpus (tests/bad_data_corpus.py) through `vir-validate`, the dataset and `vir-train`: every case
has its asserted outcome, nothing crashes or hangs, and no trained sample is silently all -100."""

from __future__ import annotations

import json
import sys

import pytest
from bad_data_corpus import MODEL_MAX_LENGTH, build_corpus
from training_fixtures import run_config, run_overrides, tiny_bases, train

from vir.cli import validate as validate_cli
from vir.data.conversation import IGNORE_INDEX
from vir.data.dataset import LazySupervisedDataset
from vir.data.records import DataFileError
from vir.models.builder import build_inputs

NUM_IMAGE_TOKENS = 16


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("bad") / "corpus")


def _dataset(bases, corpus, path):
    tokenizer, processor, config = build_inputs(run_config(bases, corpus.root / "unused", "stage2_lora"))
    assert config.num_image_tokens == NUM_IMAGE_TOKENS
    return LazySupervisedDataset(path, tokenizer, processor, num_image_tokens=NUM_IMAGE_TOKENS,
                                 image_folder=corpus.root, model_max_length=MODEL_MAX_LENGTH)


def _issues(report) -> str:
    """The one outcome `Case.outcome` names for a valid record's `inspect` report."""
    if report.skipped:
        return "skipped"
    images = [issue.split(":")[0].removeprefix("image_") for issue in report.issues if issue.startswith("image_")]
    if images:
        return f"fallback:{images[0]}"
    return "truncated" if "truncated" in report.issues else "ok"


@pytest.mark.parametrize("file", ["json", "jsonl"])
def test_every_case_has_its_outcome_in_the_dataset(bases, corpus, file):
    dataset = _dataset(bases, corpus, getattr(corpus, file))
    invalid = dict(dataset.invalid_records)
    for record_id, outcome in corpus.ids("invalid:").items():
        assert outcome.removeprefix("invalid:") in invalid.get(record_id, ""), (record_id, invalid.get(record_id))
    assert len(invalid) == len(corpus.ids("invalid:"))
    valid = [c for c in corpus.cases if not c.outcome.startswith("invalid:")]
    assert [dataset.record_id(i) for i in range(len(dataset))] == [c.id for c in valid]
    for i, case in enumerate(valid):
        assert _issues(dataset.inspect(i)) == case.outcome, case.id
    for i in range(len(dataset)):  # what trains (a skipped record is replaced) always has something to learn
        sample = dataset[i]
        assert (sample["labels"] != IGNORE_INDEX).any() and len(sample["input_ids"]) <= MODEL_MAX_LENGTH
    assert dataset.duplicate_ids == {"dup": 2} and dataset.records_without_id == 1
    assert dataset.unanswered_records == ["unanswered_final_turn"]


def test_vir_validate_names_every_bad_record(bases, corpus, tmp_path, monkeypatch, capsys):
    dump = tmp_path / "dump"
    monkeypatch.setattr(sys, "argv", ["vir-validate", *run_overrides(bases, tmp_path / "unused", "stage2_lora"),
                                      f"data.train_path={corpus.json}", f"data.image_folder={corpus.root}",
                                      f"model.model_max_length={MODEL_MAX_LENGTH}", f"validate.dump_dir={dump}"])
    with pytest.raises(SystemExit) as exit_info:
        validate_cli.main()
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "status: FAILED" in out  # invalid records: the data needs fixing
    for record_id, outcome in corpus.ids("invalid:").items():
        assert f"  {record_id}: " in out and outcome.removeprefix("invalid:") in out, record_id
    for record_id, outcome in corpus.ids("fallback:").items():
        assert f"  {record_id}: {outcome.removeprefix('fallback:')} " in out, record_id
    assert "skipped overlong_prompt: images_do_not_fit" in out
    assert "unanswered user turn (that turn is not trained): 1 (unanswered_final_turn)" in out
    assert "duplicate ids: 1 (dup x2)" in out and "records without an id: 1" in out
    summary = json.loads((dump / "summary.json").read_text())
    assert {row["id"] for row in summary["bad_images"]} == set(corpus.ids("fallback:"))
    rows = [json.loads(line) for line in (dump / "samples.jsonl").read_text().splitlines()]
    assert {row["id"] for row in rows} == {c.id for c in corpus.cases}


def test_vir_train_runs_over_the_whole_corpus_and_counts_each_case(bases, corpus, tmp_path):
    valid = [c for c in corpus.cases if not c.outcome.startswith("invalid:")]
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", f"data.train_path={corpus.json}",
                     f"data.image_folder={corpus.root}", f"model.model_max_length={MODEL_MAX_LENGTH}",
                     "training.per_device_train_batch_size=4", "data.num_workers=2", "training.save_steps=3")
    outcome = train(cfg).outcome
    stats = outcome.data_stats
    assert outcome.global_step == -(-len(valid) // 4)  # one epoch, no crash, no hang
    assert {row["id"] for row in stats["invalid_records"]} == set(corpus.ids("invalid:"))
    assert [row["id"] for row in stats["skipped_records"]] == ["overlong_prompt"]
    assert stats["skipped_records"][0]["reason"] == "images_do_not_fit"
    assert stats["truncated_records"] == ["overlong_answer"]
    fallbacks = {row["id"]: [k for k in row if k != "id"] for row in stats["fallback_image_records"]}
    assert fallbacks == {rid: [o.removeprefix("fallback:")] for rid, o in corpus.ids("fallback:").items()}
    assert stats["records_trained"] == len(valid) - 1 and stats["records"] == len(corpus.cases)
    assert stats["duplicate_ids"] == {"dup": 2} and stats["records_without_id"] == 1
    assert stats["unanswered_final_turn"] == ["unanswered_final_turn"]
    assert all(row["loss"] == row["loss"] for row in outcome.log_history if "loss" in row)  # finite


def test_cut_files_fail_naming_the_line_and_the_cut(bases, corpus):
    with pytest.raises(DataFileError, match=r"cut\.jsonl:3: malformed JSON line, the line ends at column \d+ "
                                            r"before its record does \(cut off\?\)"):
        _dataset(bases, corpus, corpus.cut_jsonl)
    with pytest.raises(DataFileError, match=r"cut\.json: malformed JSON at line \d+, column \d+: .*"
                                            r"the file ends before the list does"):
        _dataset(bases, corpus, corpus.cut_json)


def test_a_trailing_comma_is_named_at_the_comma_not_as_a_cut(bases, corpus, tmp_path):
    head = corpus.json.read_text().rstrip().removesuffix("]").rstrip()  # `[ ... }`: the list minus its bracket
    listed = tmp_path / "comma.json"
    listed.write_text(head + ",\n]\n")
    line, column = head.count("\n") + 1, len(head.rsplit("\n", 1)[-1]) + 1
    with pytest.raises(DataFileError, match=rf"comma\.json: malformed JSON, a trailing comma at line {line}, column "
                                            rf"{column}, before '\]' \(JSON allows none: delete it\)$"):
        _dataset(bases, corpus, listed)
    lines = corpus.jsonl.read_text().splitlines()
    for second, message in ((lines[1][:-1] + ",}", r"a trailing comma at column \d+, before '\}'"),
                            (lines[1] + ",", r"column \d+: Extra data \(expected")):  # a comma after the record
        per_line = tmp_path / "comma.jsonl"
        per_line.write_text("\n".join([lines[0], second, *lines[2:]]) + "\n")
        with pytest.raises(DataFileError, match=rf"comma\.jsonl:2: malformed JSON line, {message}") as raised:
            _dataset(bases, corpus, per_line)
        assert "cut off" not in str(raised.value)


def test_a_pretty_printed_object_is_named_as_such(bases, corpus, tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"data": [corpus.cases[0].record]}, indent=2))
    with pytest.raises(DataFileError, match=r"one JSON object written over several lines.*its key 'data' holds a "
                                            r"list: save that list as the file"):
        _dataset(bases, corpus, path)
