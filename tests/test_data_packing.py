"""Packed batches (vir.data.packing): the layout, and the same loss and gradients as the padded batch."""

from __future__ import annotations

import pytest
import torch
from training_fixtures import run_config, tiny_bases

from vir.data.collator import DataCollatorForSupervisedDataset
from vir.data.dataset import LazySupervisedDataset
from vir.data.packing import pack_batch, pack_rows
from vir.models.builder import build_all


def test_rows_balanced_under_the_cap_the_longest_sample_by_default():
    assert pack_rows([5, 3, 4], row_tokens=12) == [[0, 1, 2]]
    assert pack_rows([5, 3, 2]) == [[0], [1, 2]]  # the cap defaults to the longest sample
    lengths = [41, 38, 38, 34, 28, 27]
    rows = pack_rows(lengths, row_tokens=200)  # 206 tokens: two rows of 103, not 179 + 27
    assert sorted(i for row in rows for i in row) == list(range(6))
    assert sorted(sum(lengths[i] for i in row) for row in rows) == [103, 103]
    # longest-first alone gives rows of 9 and 11 tokens; a swap makes them 10 and 10, within the cap
    rows = pack_rows([5, 5, 4, 3, 3], row_tokens=10)
    assert sorted(sum([5, 5, 4, 3, 3][i] for i in row) for row in rows) == [10, 10]
    rows = pack_rows([6, 3, 3, 2, 5], row_tokens=8)
    assert len(rows) == 3 and all(sum([6, 3, 3, 2, 5][i] for i in row) <= 8 for row in rows)
    assert pack_rows([10, 2], row_tokens=4) == [[0], [1]]  # the cap rises to the longest sample
    with pytest.raises(ValueError, match="empty"):
        pack_rows([])


def test_layout_positions_restart_labels_of_first_tokens_ignored_images_in_row_order():
    def item(n, image):
        out = {"input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1)}
        out["pixel_values"] = torch.full((1 if image else 0, 3, 2, 2), float(n))
        return out

    batch = pack_batch([item(3, True), item(6, False), item(2, True)], pad_token_id=0, row_tokens=6)
    assert batch["input_ids"].shape == (2, 6) and "attention_mask" not in batch
    # rows: [1] (6 tokens) and [0, 2] (3 + 2, one pad)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 0, 1, 0]]
    assert batch["input_ids"][1].tolist() == [1, 2, 3, 1, 2, 0]
    assert batch["labels"][1].tolist() == [-100, 2, 3, -100, 2, -100]
    assert batch["labels"][0, 0] == -100
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [3.0, 2.0]  # sample 0's image, then sample 2's


@pytest.fixture(scope="module")
def model_and_items(tmp_path_factory):
    bases = tiny_bases(tmp_path_factory)
    model, tokenizer, processor = build_all(run_config(bases, tmp_path_factory.mktemp("pack"), "stage2_full"))
    dataset = LazySupervisedDataset(bases.data.train, tokenizer, processor,
                                    num_image_tokens=model.config.num_image_tokens, image_folder=bases.data.root)
    with_images = [i for i, n in enumerate(dataset.modality_lengths) if n > 0][:4]
    text_only = [i for i, n in enumerate(dataset.modality_lengths) if n < 0][:2]
    order = [with_images[0], text_only[0], with_images[1], with_images[2], text_only[1], with_images[3]]
    return model, tokenizer, [dataset[i] for i in order]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("row_tokens", [1, 100, 10_000])
@pytest.mark.parametrize("chunk", [0, 64])
def test_packed_loss_and_gradients_equal_the_padded_batch(model_and_items, row_tokens, chunk):
    model, tokenizer, items = model_and_items
    model.train()
    model.loss_chunk_size = chunk
    padded = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    packed = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, packing=True, pack_row_tokens=row_tokens)(items)
    # row_tokens=1: a row per sample, the padded batch's layout in first-fit order; else fewer positions
    assert (packed["input_ids"].numel() < padded["input_ids"].numel()) == (row_tokens != 1)
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"] != -100).sum())
    loss_padded, grads_padded = _loss_and_grads(model, padded)
    loss_packed, grads_packed = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_packed, loss_padded, atol=1e-5, rtol=1e-5)
    assert grads_packed.keys() == grads_padded.keys()
    assert any(name.startswith("model.mm_projector") for name in grads_packed)  # image features train
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_without_the_position_resets_samples_would_see_each_other(model_and_items):
    """The check above can fail: one row with plain positions (attention crossing samples) differs."""
    model, tokenizer, items = model_and_items
    model.train()
    model.loss_chunk_size = 0
    padded = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)(items)
    packed = DataCollatorForSupervisedDataset(tokenizer.pad_token_id, packing=True, pack_row_tokens=10_000)(items)
    assert packed["input_ids"].shape[0] == 1
    packed["position_ids"] = torch.arange(packed["input_ids"].shape[1]).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(model(**packed).loss, model(**padded).loss, atol=1e-4)
