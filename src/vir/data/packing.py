"""Padding-free batches: several samples share one row, each with its own position ids.

A padded batch of B samples costs B x (longest length) positions; a packed one holds the same samples in fewer
rows of at most `row_tokens` tokens (by default the longest sample's length: the attention work per row is
then no larger than padding's, and short samples share rows), with `position_ids` restarting at 0 for every
sample and no `attention_mask`. transformers reads that layout as packed sequences (`position_ids` resets):
SDPA and eager attention get a block-diagonal causal mask, flash-attention its varlen kernel (`cu_seq_lens`),
so no token attends across a sample boundary and every sample sees the positions it would see alone. Each
sample's first label is ignored (it would be the previous sample's next token; it is a BOS anyway), so loss
and gradients equal the padded batch's (tests/test_data_packing.py).

Images keep their tokens whole: a sample is never split, and `pixel_values` lists the images in the order
their tokens appear in the packed rows (row-major), which is the order `splice_image_features` fills them.
"""

from __future__ import annotations

import heapq
from typing import List, Optional, Sequence

import torch

from vir.data.conversation import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], row_tokens: Optional[int] = None) -> List[List[int]]:
    """Sample indices per row (pure), for the least padding with rows of at most `row_tokens` tokens (None:
    the longest sample's length, the width padding would give the batch; a smaller value is raised to it).

    The batch is padded to its longest row, so it costs rows x longest row: for each row count from the fewest
    that can hold the tokens up to one per sample, samples are placed longest first, each into the shortest
    row so far, then moved or swapped out of the longest row while that shortens it; the cheapest layout
    within the cap wins (fewer rows on a tie). A cap of at least the batch's total puts everything in one row."""
    if not lengths:
        raise ValueError("cannot pack an empty batch")
    capacity = max(int(row_tokens or 0), max(lengths))
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    total = sum(lengths)
    best, best_cost = None, None
    for num_rows in range(-(-total // capacity), len(lengths) + 1):
        if best_cost is not None and num_rows * lengths[order[0]] >= best_cost:
            break  # every later layout costs at least rows x the longest sample
        heap = [(0, r) for r in range(num_rows)]  # (tokens so far, row)
        rows: List[List[int]] = [[] for _ in range(num_rows)]
        for index in order:
            used, row = heapq.heappop(heap)
            rows[row].append(index)
            heapq.heappush(heap, (used + lengths[index], row))
        width = _rebalance(rows, lengths)
        if width <= capacity and (best_cost is None or num_rows * width < best_cost):
            best, best_cost = rows, num_rows * width
        if best_cost == total:
            break
    return [sorted(row) for row in best]  # keep the sampler's order inside a row


def _rebalance(rows: List[List[int]], lengths: Sequence[int]) -> int:
    """Lower the longest row in place by moving one of its samples to another row, or swapping it for a shorter
    one, while that makes both rows shorter than it was; returns the final longest row's tokens."""
    used = [sum(lengths[i] for i in row) for row in rows]
    while (move := _shortening_move(rows, used, lengths)) is not None:
        top, a, other, b = move
        rows[top].remove(a)
        rows[other].append(a)
        delta = lengths[a]
        if b is not None:
            rows[other].remove(b)
            rows[top].append(b)
            delta -= lengths[b]
        used[top] -= delta
        used[other] += delta
    return max(used)


def _shortening_move(rows: List[List[int]], used: List[int], lengths: Sequence[int]):
    """`(top, a, other, b)`: sample `a` of the longest row `top` goes to row `other` (for its sample `b`, or
    for nothing when `b` is None) and both rows end shorter than `top` was; None when no such move exists."""
    top = max(range(len(rows)), key=used.__getitem__)
    for a in rows[top]:
        for other in range(len(rows)):
            if other == top:
                continue
            for b in [None, *rows[other]]:
                delta = lengths[a] - (lengths[b] if b is not None else 0)
                if delta > 0 and used[other] + delta < used[top]:
                    return top, a, other, b
    return None


def pack_batch(instances: Sequence[dict], pad_token_id: int, row_tokens: Optional[int] = None,
               pad_to_multiple_of: Optional[int] = None) -> dict:
    """Collate dataset items (`input_ids`, `labels`, optional `pixel_values`) into packed rows:
    `{"input_ids": [R, T], "labels": [R, T], "position_ids": [R, T], "pixel_values": [N, 3, H, W]}`.

    Rows shorter than the longest are filled with the pad id, ignored labels and positions counting from 0 (a
    sequence of their own, which no sample attends to)."""
    lengths = [len(item["input_ids"]) for item in instances]
    rows = pack_rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    order: List[int] = []
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            item, n = instances[index], lengths[index]
            input_ids[r, start:start + n] = torch.as_tensor(item["input_ids"], dtype=torch.long)
            labels[r, start:start + n] = torch.as_tensor(item["labels"], dtype=torch.long)
            labels[r, start] = IGNORE_INDEX
            position_ids[r, start:start + n] = torch.arange(n)
            start += n
            order.append(index)
        position_ids[r, start:] = torch.arange(width - start)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if "pixel_values" in instances[0]:
        batch["pixel_values"] = torch.cat([instances[i]["pixel_values"] for i in order], dim=0)
    return batch
