"""`vir-validate` on a small fixture set with broken records."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vir.cli.validate import run
from vir.utils.config import compose_config


@pytest.fixture
def fixture_data(tmp_path, tokenizer_dir):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "ok.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "outside.png").write_bytes(b"")
    records = [
        {"id": "single", "image": "images/ok.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "multi", "image": ["images/ok.png", "images/ok.png"],
         "conversations": [{"from": "human", "value": "Same?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "broken", "image": "images/corrupt.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Noise."}]},
        {"id": "missing", "image": "images/nope.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Nothing."}]},
        {"id": "escape", "image": "../outside.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Refused."}]},
    ]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return tmp_path, path, records


def _cfg(tmp_path, path, tokenizer_dir, *extra):
    return compose_config([
        "model=tiny", f"data.train_path={path}", f"data.image_folder={tmp_path}",
        f"model.tokenizer_path={tokenizer_dir}", f"validate.dump_dir={tmp_path / 'dump'}", *extra,
    ])


def test_validate_counts_every_kind_of_record(fixture_data, tokenizer_dir, capsys):
    tmp_path, path, records = fixture_data
    status = run(_cfg(tmp_path, path, tokenizer_dir))
    out = capsys.readouterr().out
    assert status == 0, out
    summary = json.loads((tmp_path / "dump" / "summary.json").read_text())
    assert summary["records"] == 6 and summary["valid"] == 6 and summary["invalid"] == []
    assert summary["images"] == {"ok": 3, "missing": 1, "corrupt": 1, "refused": 1, "too_large": 0}
    assert (summary["text_only"], summary["single_image"], summary["multi_image"]) == (1, 4, 1)
    rows = [json.loads(line) for line in (tmp_path / "dump" / "samples.jsonl").read_text().splitlines()]
    # The fraction is the dumped labels' share of trained (not -100) tokens, and the answers are only part of it.
    labels = [label for row in rows for label in row["labels"]]
    assert summary["trained_token_fraction"] == pytest.approx(sum(x != -100 for x in labels) / len(labels))
    assert 0 < summary["trained_token_fraction"] < 0.5
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    by_id = {r["id"]: r for r in rows}
    assert by_id["escape"]["issues"] == ["image_refused:../outside.png"]
    assert by_id["multi"]["num_images"] == 2
    assert (tmp_path / "dump" / "tokenizer" / "tokenizer_config.json").is_file()
    assert "refused 1" in out and "OK, data can train" in out


def test_validate_fails_listing_every_invalid_id(fixture_data, tokenizer_dir, capsys):
    tmp_path, path, records = fixture_data
    records.append({"id": "two-tags-one-image", "image": "images/ok.png",
                    "conversations": [{"from": "human", "value": "<image><image>x"}, {"from": "gpt", "value": "y"}]})
    records.append({"id": "no-answer", "conversations": [{"from": "human", "value": "x"}]})
    path.write_text(json.dumps(records))
    status = run(_cfg(tmp_path, path, tokenizer_dir))
    out = capsys.readouterr().out
    assert status == 1
    assert "two-tags-one-image" in out and "no-answer" in out and "FAILED" in out
    rows = [json.loads(line) for line in (tmp_path / "dump" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[-1]["issues"][0].startswith("invalid:")


def test_dumped_labels_match_a_recheck_with_the_dumped_tokenizer(fixture_data, tokenizer_dir):
    from transformers import AutoTokenizer

    tmp_path, path, _ = fixture_data
    run(_cfg(tmp_path, path, tokenizer_dir))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "dump" / "tokenizer"))
    row = json.loads((tmp_path / "dump" / "samples.jsonl").read_text().splitlines()[2])  # text-only
    trained = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(trained) == "Hello.<|eot_id|>"


def test_records_without_an_id_and_shared_ids_are_reported_and_counted(tmp_path, tokenizer_dir, capsys):
    conversation = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]
    records = [{"id": "1", "conversations": conversation}, {"conversations": conversation},
               {"id": None, "conversations": conversation}, {"id": "dup", "conversations": conversation},
               {"id": "dup", "conversations": conversation}, {"id": "dup", "conversations": conversation}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    assert run(_cfg(tmp_path, path, tokenizer_dir)) == 0
    out = capsys.readouterr().out
    assert "records without an id: 2" in out and "duplicate ids: 1 (dup x3)" in out
    rows = [json.loads(line) for line in (tmp_path / "dump" / "samples.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows][:3] == ["1", "#1", "#2"]  # positions, never another record's id
