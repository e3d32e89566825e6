"""LazySupervisedDataset: parsing, invalid records, image fallbacks, counters across workers, truncation."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from transformers import CLIPImageProcessorPil

from vir.data import images as images_module
from vir.data.accounting import RecordLedger
from vir.data.collator import DataCollatorForSupervisedDataset
from vir.data.conversation import IGNORE_INDEX
from vir.data.dataset import COUNTERS, LazySupervisedDataset
from vir.data.records import DataFileError

NUM_IMAGE_TOKENS = 4


def conv(question="What is it?", answer="A cat."):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def processor():
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture
def data_dir(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(images / "wide.png")
    Image.new("L", (24, 24), 128).save(images / "gray.png")
    Image.new("RGB", (64, 64), (0, 255, 0)).save(images / "full.png")
    data = (images / "full.png").read_bytes()
    (images / "corrupt.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    return tmp_path


RECORDS = [
    {"id": "ok", "image": "wide.png", "conversations": conv("<image>\nWhat is it?")},
    {"id": "text", "conversations": conv("Hello?", "Hi.")},
    {"id": "two", "image": ["gray.png", "wide.png"], "conversations": conv("Compare.")},
    {"id": "corrupt", "image": "corrupt.png", "conversations": conv()},
    {"id": "missing", "image": "nope.png", "conversations": conv()},
    {"id": "refused", "image": "../outside.png", "conversations": conv()},
    {"id": "bad_tags", "image": "wide.png", "conversations": conv("<image><image> two?")},
    {"id": "no_reply", "conversations": [{"from": "human", "value": "?"}]},
]


def write_json(path, records, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return path


def make_dataset(data_dir, tokenizer, processor, records=RECORDS, **kwargs):
    kwargs = {"image_folder": data_dir / "images", "num_image_tokens": NUM_IMAGE_TOKENS, **kwargs}
    return LazySupervisedDataset(write_json(data_dir / "data.json", records), tokenizer, processor, **kwargs)


def black_pixels(processor):
    return processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")["pixel_values"][0]


def test_items_have_expected_shapes_and_image_tokens(data_dir, tokenizer, processor):
    dataset = make_dataset(data_dir, tokenizer, processor)
    assert len(dataset) == 6 and dataset.num_records_total == 8
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for i, num_images in enumerate([1, 0, 2, 1, 1, 1]):
        item = dataset[i]
        assert item["pixel_values"].shape == (num_images, 3, 32, 32)
        assert item["pixel_values"].dtype == torch.float32
        assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == item["labels"].shape
        assert int((item["input_ids"] == image_id).sum()) == num_images * NUM_IMAGE_TOKENS
        assert bool((item["labels"] != IGNORE_INDEX).any())
    assert dataset.record_id(2) == "two"


def test_invalid_records_are_excluded_and_reported_once(data_dir, tokenizer, processor, caplog):
    with caplog.at_level(logging.WARNING, logger="vir.data.dataset"):
        dataset = make_dataset(data_dir, tokenizer, processor)
    assert [rid for rid, _ in dataset.invalid_records] == ["bad_tags", "no_reply"]
    assert "2 <image> tag(s) but 1 image(s)" in dataset.invalid_records[0][1]
    summaries = [r for r in caplog.records if "invalid" in r.getMessage()]
    assert len(summaries) == 1 and "bad_tags" in summaries[0].getMessage()
    assert "no_reply" in summaries[0].getMessage()


def test_records_are_stored_compactly(data_dir, tokenizer, processor):
    dataset = make_dataset(data_dir, tokenizer, processor)
    assert dataset._store.buffer.dtype == np.uint8 and dataset._store.offsets.dtype == np.int64
    assert not [name for name, value in vars(dataset).items() if isinstance(value, (list, dict)) and len(value) >= 6]


def test_image_fallbacks_are_black_counted_and_rate_limited(data_dir, tokenizer, processor, caplog, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(images_module.Image, "open",
                        lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k))
    dataset = make_dataset(data_dir, tokenizer, processor, max_image_warnings=2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vir.data.dataset"):
        items = [dataset[i] for i in range(len(dataset))]
    black = black_pixels(processor)
    for i in (3, 4, 5):  # corrupt, missing, refused
        assert torch.allclose(items[i]["pixel_values"][0], black)
    assert not torch.allclose(items[0]["pixel_values"][0], black)
    assert dataset.stats() == {"images_ok": 3, "images_missing": 1, "images_corrupt": 1, "images_refused": 1,
                               "images_too_large": 0,
                               "truncated": 0, "skipped": 0}
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "'corrupt'" in messages[0] and "corrupt.png" in messages[0]
    assert "'missing'" in messages[1] and "further image warnings suppressed" in messages[2]
    assert not any("outside" in path for path in opened)


def test_pad_fills_with_processor_mean_and_crop_does_not(data_dir, tokenizer, processor):
    padded = make_dataset(data_dir, tokenizer, processor)[0]["pixel_values"][0]  # 40x20 red image
    cropped = make_dataset(data_dir, tokenizer, processor, image_aspect_ratio="crop")[0]["pixel_values"][0]
    assert padded[:, 0, :].abs().max() < 0.02  # top rows: mean colour, ~0 after normalisation
    assert padded[:, 16, :].abs().max() > 1  # centre: red
    assert cropped[:, 0, :].abs().max() > 1  # crop keeps the image all the way up
    with pytest.raises(ValueError, match="data.image_aspect_ratio"):
        make_dataset(data_dir, tokenizer, processor, image_aspect_ratio="stretch")


def test_lengths_include_image_tokens_and_modality_sign(data_dir, tokenizer, processor):
    dataset = make_dataset(data_dir, tokenizer, processor)
    lengths, modality = dataset.lengths, dataset.modality_lengths
    assert len(lengths) == len(modality) == len(dataset)
    assert modality[1] == -lengths[1] < 0 and all(m > 0 for k, m in enumerate(modality) if k != 1)
    assert lengths[2] >= 2 * NUM_IMAGE_TOKENS
    actual = len(dataset[2]["input_ids"])
    assert actual / 2 <= lengths[2] <= actual * 2


def test_overlong_samples_are_truncated_or_replaced(data_dir, tokenizer, processor, caplog):
    records = [
        {"id": "long_image", "image": "wide.png", "conversations": conv("Describe " * 20 + "<image>")},
        {"id": "long_text", "conversations": conv("Hi.", "word " * 40)},
    ]
    dataset = make_dataset(data_dir, tokenizer, processor, records=records, model_max_length=30)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vir.data.dataset"):
        first = dataset[0]
    assert "long_image" in caplog.text and "images_do_not_fit" in caplog.text
    assert first["pixel_values"].shape[0] == 0 and len(first["input_ids"]) == 30  # the next record, cut
    assert bool((first["labels"] != IGNORE_INDEX).any())
    assert dataset.stats()["skipped"] == 1 and dataset.stats()["truncated"] == 1
    report = dataset.inspect(0)
    assert report.skipped and report.issues == ["truncated", "skipped:images_do_not_fit"]
    assert dataset.inspect(1).issues == ["truncated"] and len(dataset.inspect(1).input_ids) == 30

    # Per record, what trained: three epochs over both indices train record 1 six times; record 0 is one
    # skipped record (not three), record 1 one truncated record.
    ledger = RecordLedger(len(dataset))
    for _ in range(3):
        for i in range(len(dataset)):
            ledger.add(dataset[i]["record_events"])
    summary = ledger.summary(dataset.record_id, dataset.skip_reason)
    assert {k: summary[k] for k in ("samples_trained", "records_trained", "skipped", "truncated")} == {
        "samples_trained": 6, "records_trained": 1, "skipped": 1, "truncated": 1}
    assert summary["skipped_records"] == [{"id": "long_image", "reason": "images_do_not_fit"}]
    assert summary["truncated_records"] == ["long_text"]


def test_nothing_trainable_raises(data_dir, tokenizer, processor):
    records = [{"id": "x", "image": "wide.png", "conversations": conv("<image>")}]
    dataset = make_dataset(data_dir, tokenizer, processor, records=records, model_max_length=3)
    with pytest.raises(RuntimeError, match="no record can be trained"):
        dataset[0]


def test_inspect_reports_issues_without_counting(data_dir, tokenizer, processor):
    dataset = make_dataset(data_dir, tokenizer, processor)
    reports = [dataset.inspect(i) for i in range(len(dataset))]
    assert [r.issues for r in reports] == [[], [], [], ["image_corrupt:corrupt.png"], ["image_missing:nope.png"],
                                           ["image_refused:../outside.png"]]
    assert [r.num_images for r in reports] == [1, 0, 2, 1, 1, 1]
    assert reports[0].id == "ok" and reports[0].input_ids == dataset[0]["input_ids"].tolist()
    assert dataset.stats()["images_corrupt"] == 0
    assert [json.loads(json.dumps(r))["id"] for r in dataset.iter_raw_records()] == [r["id"] for r in RECORDS]


def test_dataloader_workers_share_counters(data_dir, tokenizer, processor):
    dataset = make_dataset(data_dir, tokenizer, processor, num_workers=2)
    loader = DataLoader(dataset, batch_size=2, num_workers=2,
                        collate_fn=DataCollatorForSupervisedDataset(tokenizer.pad_token_id))
    for _ in range(2):
        batches = list(loader)
    assert sum(b["pixel_values"].shape[0] for b in batches) == 6
    assert dataset.stats() == {"images_ok": 6, "images_missing": 2, "images_corrupt": 2, "images_refused": 2,
                               "images_too_large": 0,
                               "truncated": 0, "skipped": 0}
    dataset.reset_stats()
    assert set(dataset.stats().values()) == {0} and set(dataset.stats()) == set(COUNTERS)


def test_jsonl_and_errors_name_the_file_and_line(data_dir, tokenizer, processor):
    path = write_json(data_dir / "data.jsonl", RECORDS[:2], jsonl=True)
    dataset = LazySupervisedDataset(path, tokenizer, processor, num_image_tokens=2, image_folder=data_dir / "images")
    assert len(dataset) == 2
    path.write_text(json.dumps(RECORDS[0]) + "\n{broken\n")
    with pytest.raises(DataFileError, match=r"data.jsonl:2: malformed JSON"):
        LazySupervisedDataset(path, tokenizer, processor, num_image_tokens=2, image_folder=data_dir / "images")
    bad_list = data_dir / "bad.json"
    bad_list.write_text('[\n{"id": 1},\n{oops}\n]')
    with pytest.raises(DataFileError, match=r"bad.json: malformed JSON at line 3"):
        LazySupervisedDataset(bad_list, tokenizer, processor, num_image_tokens=2, image_folder=data_dir / "images")


def test_from_config(data_dir, tokenizer, processor):
    path = write_json(data_dir / "data.json", RECORDS)
    cfg = SimpleNamespace(train_path=str(path), eval_path=None, test_path=str(data_dir / "nope.json"),
                          image_folder=str(data_dir / "images"), template="plain", system_prompt=None,
                          image_aspect_ratio="crop", num_workers=0, max_image_warnings=5)
    dataset = LazySupervisedDataset.from_config(cfg, "train", tokenizer, processor, num_image_tokens=3,
                                                model_max_length=64)
    assert dataset.template.name == "plain" and dataset.image_aspect_ratio == "crop" and len(dataset) == 6
    with pytest.raises(FileNotFoundError, match=r"data.test_path.*nope.json"):
        LazySupervisedDataset.from_config(cfg, "test", tokenizer, processor, 3, 64)
    with pytest.raises(ValueError, match=r"data.eval_path is not set"):
        LazySupervisedDataset.from_config(cfg, "eval", tokenizer, processor, 3, 64)
    with pytest.raises(ValueError, match="unknown split"):
        LazySupervisedDataset.from_config(cfg, "dev", tokenizer, processor, 3, 64)
