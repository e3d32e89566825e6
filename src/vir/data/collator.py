"""Batch padding: right-pad ids with the pad id, labels with -100; concatenate every image in batch order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from vir.data.conversation import IGNORE_INDEX
from vir.data.packing import pack_batch


def pad_batch(
    sequences: Sequence[Union[torch.Tensor, Sequence[int]]], pad_value: int, pad_to_multiple_of: Optional[int] = None,
    side: str = "right",
) -> torch.Tensor:
    """Pad 1-D sequences into a LongTensor [B, T], T the longest length rounded up to `pad_to_multiple_of` when
    given; `side="left"` puts the padding in front (prompts for generation), else after (training batches)."""
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: want 'left' or 'right'")
    if not sequences:
        raise ValueError("cannot pad an empty batch")
    tensors = [torch.as_tensor(seq, dtype=torch.long) for seq in sequences]
    length = max(t.numel() for t in tensors)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = torch.full((len(tensors), length), pad_value, dtype=torch.long)
    for row, tensor in enumerate(tensors):
        if side == "right":
            batch[row, : tensor.numel()] = tensor
        elif tensor.numel():
            batch[row, -tensor.numel() :] = tensor
    return batch


@dataclass
class DataCollatorForSupervisedDataset:
    """Collates `LazySupervisedDataset` items into
    `{"input_ids": [B, T], "labels": [B, T], "attention_mask": [B, T], "pixel_values": [N, 3, H, W]}`.

    `pixel_values` concatenates every item's images in batch order (N = total images; text-only items add
    none), which is the order in which the model meets the image tokens in `input_ids`. With
    `keep_record_events`, the items' `record_events` rows are concatenated under that key too, for the trainer
    to count and remove before the forward pass (`vir.data.accounting`).

    With `packing`, the items share rows instead (`vir.data.packing`): `position_ids` restart per sample, there
    is no `attention_mask` and almost no padding; `pack_row_tokens` caps a row (None: one row per batch).
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    keep_record_events: bool = False
    packing: bool = False
    pack_row_tokens: Optional[int] = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None: prepare the tokenizer with vir.models.builder.prepare_tokenizer")

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        if self.packing:
            batch = pack_batch(instances, self.pad_token_id, self.pack_row_tokens, self.pad_to_multiple_of)
            return self._with_events(batch, instances)
        input_ids = [item["input_ids"] for item in instances]
        batch = {
            "input_ids": pad_batch(input_ids, self.pad_token_id, self.pad_to_multiple_of),
            "labels": pad_batch([item["labels"] for item in instances], IGNORE_INDEX, self.pad_to_multiple_of),
            "attention_mask": pad_batch([torch.ones(len(ids), dtype=torch.long) for ids in input_ids], 0,
                                        self.pad_to_multiple_of),
        }
        if "pixel_values" in instances[0]:
            batch["pixel_values"] = torch.cat([item["pixel_values"] for item in instances], dim=0)
        return self._with_events(batch, instances)

    def _with_events(self, batch: dict, instances: Sequence[dict]) -> dict:
        if self.keep_record_events and "record_events" in instances[0]:
            batch["record_events"] = torch.cat([item["record_events"] for item in instances], dim=0)
        return batch
