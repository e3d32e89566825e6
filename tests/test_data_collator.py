"""Collation: right padding with the pad id, -100 labels, attention mask, images concatenated in order."""

from __future__ import annotations

import pytest
import torch

from vir.data.collator import DataCollatorForSupervisedDataset, pad_batch


def item(ids, num_images, fill=0.0):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "labels": ids.clone(), "pixel_values": torch.full((num_images, 3, 2, 2), fill)}


def test_pad_batch_right_pads_and_rounds_up():
    assert pad_batch([[1, 2, 3], [4]], pad_value=7).tolist() == [[1, 2, 3], [4, 7, 7]]
    padded = pad_batch([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_value=-100, pad_to_multiple_of=4)
    assert padded.dtype == torch.long and padded.tolist() == [[1, 2, 3, -100], [4, -100, -100, -100]]
    assert pad_batch([[1, 2, 3, 4]], 0, pad_to_multiple_of=4).shape == (1, 4)
    with pytest.raises(ValueError):
        pad_batch([], 0)


def test_collator_pads_with_the_tokenizer_pad_id(tokenizer):
    pad_id = tokenizer.pad_token_id
    assert pad_id != 0
    batch = DataCollatorForSupervisedDataset(pad_id)([item([5, 6, 7], 1, 1.0), item([8], 0), item([9, 9], 2, 2.0)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad_id, pad_id], [9, 9, pad_id]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100], [9, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch["pixel_values"].shape == (3, 3, 2, 2)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]  # batch order


def test_collator_pad_to_multiple_and_text_only_batch():
    batch = DataCollatorForSupervisedDataset(pad_token_id=3, pad_to_multiple_of=8)([item([1, 2], 0), item([4], 0)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 8)
    assert batch["attention_mask"].sum().item() == 3
    assert batch["pixel_values"].shape == (0, 3, 2, 2)


def test_collator_needs_a_pad_id():
    with pytest.raises(ValueError, match="prepare_tokenizer"):
        DataCollatorForSupervisedDataset(pad_token_id=None)


def test_pad_batch_pads_on_the_left_for_prompts():
    assert pad_batch([[1, 2, 3], [4]], pad_value=0, side="left").tolist() == [[1, 2, 3], [0, 0, 4]]
    assert pad_batch([[5], []], pad_value=9, side="left").tolist() == [[5], [9]]
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], 0, side="middle")
