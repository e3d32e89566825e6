"""LLaVA's modality-grouped sampling: batches hold only multimodal or only text-only samples, of similar
length, so padding is small and no batch mixes image and text-only work unevenly across ranks; and micro-batches
cut by a token budget instead of a sample count (`TokenBudgetBatchSampler`)."""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch
from torch.utils.data import Sampler
from transformers.trainer_pt_utils import BatchRebalanceSampler


def modality_grouped_indices(
    modality_lengths: Sequence[int],
    megabatch_size: int,
    generator: Optional[torch.Generator] = None,
    batch_size: Optional[int] = None,
) -> List[int]:
    """A permutation of `range(len(modality_lengths))` (pure).

    `modality_lengths` uses LLaVA's convention: `+length` multimodal, `-length` text-only. Each modality is
    shuffled, cut into megabatches of `megabatch_size`, each megabatch sorted longest first; the full
    megabatches of both modalities are then shuffled together and the (at most two) partial ones go last, as in
    LLaVA: a partial megabatch in the middle would shift every later batch boundary, so batches (of a size
    dividing `megabatch_size`) would straddle two megabatches and mix modalities; at the end only the tail can.

    With `batch_size` (a divisor of `megabatch_size`, e.g. a megabatch of 32 batches as HF's `group_by_length`
    uses 50), each sorted megabatch is cut into batches of similar length and those batches, not whole
    megabatches, are shuffled: little padding, and no run of long-to-short batches. The whole batches of a
    partial megabatch join that shuffle too; only each modality's last `< batch_size` samples go last. Else a
    modality smaller than one megabatch (1000 text-only records against a megabatch of 32 x 32) would come
    all at once at the end of every epoch: 31 text-only steps in a row.
    """
    if batch_size is not None and (batch_size < 1 or megabatch_size % batch_size):
        raise ValueError(f"batch_size={batch_size} must divide megabatch_size={megabatch_size}")
    full: List[List[int]] = []
    partial: List[List[int]] = []
    for sign in (1, -1):
        group = [i for i, length in enumerate(modality_lengths) if (length > 0) == (sign > 0)]
        if not group:
            continue
        order = torch.randperm(len(group), generator=generator).tolist()
        shuffled = [group[k] for k in order]
        for start in range(0, len(shuffled), megabatch_size):
            chunk = sorted(shuffled[start : start + megabatch_size], key=lambda i: -abs(modality_lengths[i]))
            (full if len(chunk) == megabatch_size else partial).append(chunk)
    if batch_size is not None:
        batches = [chunk[j : j + batch_size] for chunk in full + partial for j in range(0, len(chunk), batch_size)]
        full = [batch for batch in batches if len(batch) == batch_size]
        partial = [batch for batch in batches if len(batch) < batch_size]
    order = torch.randperm(len(full), generator=generator).tolist()
    return [i for k in order for i in full[k]] + [i for chunk in partial for i in chunk]


class ModalityGroupedSampler(Sampler[int]):
    """Sampler over `dataset.modality_lengths` (see `modality_grouped_indices`); new order every epoch."""

    def __init__(
        self, modality_lengths: Sequence[int], megabatch_size: int, seed: int = 0, batch_size: Optional[int] = None
    ):
        self.modality_lengths = list(modality_lengths)
        self.megabatch_size = megabatch_size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.modality_lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return iter(modality_grouped_indices(self.modality_lengths, self.megabatch_size, generator, self.batch_size))


def grouped_train_sampler(args, modality_lengths: Sequence[int], length_grouping: int = 1) -> ModalityGroupedSampler:
    """The sampler a Trainer with `TrainingArguments` `args` uses for grouped batches: megabatches of
    `length_grouping` optimizer steps over every process, each cut into step batches of similar length when
    `length_grouping` > 1 (each process then takes a contiguous part of every step batch)."""
    if length_grouping < 1:
        raise ValueError(f"length_grouping={length_grouping} must be >= 1")
    step_batch = args.train_batch_size * args.world_size  # one forward pass over all ranks
    megabatch = step_batch * args.gradient_accumulation_steps * length_grouping
    return ModalityGroupedSampler(modality_lengths, megabatch, seed=args.seed,
                                  batch_size=step_batch if length_grouping > 1 else None)


def token_budget_batches(modality_lengths: Sequence[int], max_tokens: int, padded: bool = False,
                         generator: Optional[torch.Generator] = None) -> List[List[int]]:
    """Micro-batches of similar length, each within `max_tokens` (pure; every index exactly once).

    Each modality (LLaVA's sign convention) is ordered by length (ties shuffled by `generator`) and cut
    greedily: a batch grows while its tokens stay within the budget: the sum of its lengths (`padded=False`,
    packed rows) or its size x its longest length (`padded=True`). A sample longer than the budget is a batch
    of its own. Batches never mix modalities."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    batches: List[List[int]] = []
    for sign in (1, -1):
        group = [i for i, length in enumerate(modality_lengths) if (length > 0) == (sign > 0)]
        if generator is not None:
            group = [group[k] for k in torch.randperm(len(group), generator=generator).tolist()]
        group.sort(key=lambda i: abs(modality_lengths[i]))  # stable: ties keep the shuffled order
        batch: List[int] = []
        tokens = 0  # the batch's summed lengths
        for index in group:
            length = abs(modality_lengths[index])
            cost = (len(batch) + 1) * length if padded else tokens + length
            if batch and cost > max_tokens:
                batches.append(batch)
                batch, tokens = [], 0
            batch.append(index)
            tokens += length
        if batch:
            batches.append(batch)
    return batches


class TokenBudgetBatchSampler(BatchRebalanceSampler):
    """Yields this process's micro-batches (lists of indices) of at most `max_tokens` tokens each, instead of a
    fixed number of samples: many short samples or few long ones per step, fairseq's `batch_by_size`.

    The batches are cut once (`token_budget_batches`, seeded) and their order is shuffled every epoch, so every
    epoch has the same length, which the Trainer reads once. Each optimizer step takes `world_size x
    grad_accum` consecutive batches, dealt to the processes round-robin; the last step is completed with
    batches from the epoch's start (as accelerate's `even_batches` does), so no sample is left out. A
    `BatchRebalanceSampler` for the Trainer: it is passed as the DataLoader's `batch_sampler` and is not
    sharded again.
    """

    def __init__(self, modality_lengths: Sequence[int], max_tokens: int, world_size: int = 1, rank: int = 0,
                 grad_accum: int = 1, seed: int = 0, padded: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.batches = token_budget_batches(modality_lengths, max_tokens, padded, torch.Generator().manual_seed(seed))
        self.per_step = world_size * grad_accum
        self.world_size, self.rank, self.grad_accum, self.seed = world_size, rank, grad_accum, seed
        self.num_steps = -(-len(self.batches) // self.per_step)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_steps * self.grad_accum

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.batches), generator=generator).tolist()
        order += order[: self.num_steps * self.per_step - len(order)]
        for step in range(self.num_steps):
            for micro in range(self.grad_accum):
                yield self.batches[order[step * self.per_step + micro * self.world_size + self.rank]]


def token_budget_sampler(args, modality_lengths: Sequence[int], max_tokens: int,
                         packed: bool) -> TokenBudgetBatchSampler:
    """The token-budget sampler of a Trainer with `TrainingArguments` `args` on this process."""
    return TokenBudgetBatchSampler(modality_lengths, max_tokens, world_size=max(1, args.world_size),
                                   rank=args.process_index, grad_accum=args.gradient_accumulation_steps,
                                   seed=args.seed, padded=not packed)
