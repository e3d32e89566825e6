"""Modality-grouped sampling: a permutation, single-modality batches, deterministic per seed and epoch."""

from __future__ import annotations

import pytest
import torch

from vir.training.sampler import ModalityGroupedSampler, modality_grouped_indices


def _lengths(num_images: int, num_text: int, seed: int = 0) -> list[int]:
    """LLaVA's convention: +length multimodal, -length text-only; interleaved so groups are not contiguous."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for n in torch.randint(5, 200, (num_images,), generator=g)]
    lengths += [-int(n) for n in torch.randint(5, 200, (num_text,), generator=g)]
    order = torch.randperm(len(lengths), generator=g).tolist()
    return [lengths[k] for k in order]


def _batches(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]


def _is_mixed(batch: list[int], lengths: list[int]) -> bool:
    return len({lengths[i] > 0 for i in batch}) > 1


@pytest.mark.parametrize("num_images,num_text,megabatch", [(48, 16, 8), (40, 24, 8), (37, 11, 6), (5, 0, 4), (0, 7, 3)])
def test_indices_are_a_permutation(num_images, num_text, megabatch):
    lengths = _lengths(num_images, num_text)
    indices = modality_grouped_indices(lengths, megabatch, torch.Generator().manual_seed(0))
    assert sorted(indices) == list(range(len(lengths)))


@pytest.mark.parametrize("batch_size,megabatch", [(4, 8), (8, 8), (2, 16)])
def test_batches_never_mix_modalities_when_the_megabatch_divides_the_groups(batch_size, megabatch):
    lengths = _lengths(6 * megabatch, 2 * megabatch)
    for seed in range(5):
        indices = modality_grouped_indices(lengths, megabatch, torch.Generator().manual_seed(seed))
        assert not [b for b in _batches(indices, batch_size) if _is_mixed(b, lengths)]


def test_megabatches_are_sorted_longest_first_and_both_modalities_interleave():
    lengths = _lengths(64, 64)
    indices = modality_grouped_indices(lengths, 8, torch.Generator().manual_seed(0))
    megabatches = _batches(indices, 8)
    for megabatch in megabatches:
        sizes = [abs(lengths[i]) for i in megabatch]
        assert sizes == sorted(sizes, reverse=True)
    kinds = [lengths[m[0]] > 0 for m in megabatches]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)  # shuffled together, not in blocks


def test_partial_megabatches_go_last_so_only_the_tail_batch_can_mix():
    # 37 multimodal + 11 text-only with megabatches of 8: a partial megabatch of 5 and one of 3. Placed in the
    # middle they would shift every later batch boundary and mix many batches (as LLaVA avoids).
    lengths = _lengths(37, 11)
    for seed in range(10):
        indices = modality_grouped_indices(lengths, 8, torch.Generator().manual_seed(seed))
        batches = _batches(indices, 4)
        mixed = [k for k, b in enumerate(batches) if _is_mixed(b, lengths)]
        assert mixed in ([], [len(batches) - 2], [len(batches) - 1]), (seed, mixed)
        assert len(mixed) <= 1


def test_deterministic_per_seed_and_epoch():
    lengths = _lengths(40, 24)
    first, again = ModalityGroupedSampler(lengths, 8, seed=3), ModalityGroupedSampler(lengths, 8, seed=3)
    assert len(first) == len(lengths)
    epoch0 = list(first)
    assert list(again) == epoch0
    epoch1 = list(first)  # iterating again moves to the next epoch
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    again.set_epoch(1)
    assert list(again) == epoch1
    again.set_epoch(0)
    assert list(again) == epoch0
    assert list(ModalityGroupedSampler(lengths, 8, seed=4)) != epoch0


def _padded_tokens(indices: list[int], lengths: list[int], batch_size: int) -> int:
    return sum(len(b) * max(abs(lengths[i]) for i in b) for b in _batches(indices, batch_size))


def test_length_grouping_cuts_padding_and_keeps_batches_single_modality():
    lengths = _lengths(32 * 8 * 4, 32 * 8)  # whole megabatches of 8 batches of 4 in both modalities
    plain = modality_grouped_indices(lengths, 4, torch.Generator().manual_seed(0))
    grouped = modality_grouped_indices(lengths, 32, torch.Generator().manual_seed(0), batch_size=4)
    assert sorted(grouped) == list(range(len(lengths)))
    assert not [b for b in _batches(grouped, 4) if _is_mixed(b, lengths)]
    # Lengths are uniform in 5..200: similar-length batches pad far less than LLaVA's per-batch grouping.
    assert _padded_tokens(grouped, lengths, 4) < 0.75 * _padded_tokens(plain, lengths, 4)
    # The batches are shuffled, not left in each megabatch's long-to-short order.
    firsts = [abs(lengths[b[0]]) for b in _batches(grouped, 4)[:8]]
    assert firsts != sorted(firsts, reverse=True)


def test_length_grouping_spreads_a_modality_smaller_than_a_megabatch_over_the_epoch():
    # 1000 text-only records against megabatches of 32 batches of 32 (the GPU recipe's stage 2): all of them
    # once formed one partial megabatch, trained as 31 text-only steps in a row at the end of every epoch.
    lengths = _lengths(19000, 1000)
    for seed in range(3):
        indices = modality_grouped_indices(lengths, 32 * 32, torch.Generator().manual_seed(seed), batch_size=32)
        assert sorted(indices) == list(range(len(lengths)))
        batches = _batches(indices, 32)
        text_only = [k for k, b in enumerate(batches) if lengths[b[0]] < 0 and not _is_mixed(b, lengths)]
        assert len(text_only) == 31  # 1000 // 32 whole batches; the 8 left over share the tail batch
        assert min(text_only) < len(batches) // 2  # spread over the epoch, not a block at its end
        assert max(b - a for a, b in zip(text_only, text_only[1:])) > 1
        mixed = [k for k, b in enumerate(batches) if _is_mixed(b, lengths)]
        assert mixed in ([], [len(batches) - 1], [len(batches) - 2]), (seed, mixed)


def test_length_grouping_needs_a_batch_size_that_divides_the_megabatch():
    with pytest.raises(ValueError, match="batch_size=3 must divide megabatch_size=8"):
        modality_grouped_indices(_lengths(8, 0), 8, batch_size=3)


@pytest.mark.parametrize("padded", [False, True])
def test_token_budget_batches_partition_within_budget_single_modality(padded):
    from vir.training.sampler import token_budget_batches

    lengths = _lengths(50, 20) + [500]  # one sample over the budget: a batch of its own
    batches = token_budget_batches(lengths, 400, padded, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [len(lengths) - 1] in batches
    for batch in batches:
        sizes = [abs(lengths[i]) for i in batch]
        cost = len(sizes) * max(sizes) if padded else sum(sizes)
        assert cost <= 400 or len(batch) == 1
        assert not _is_mixed(batch, lengths)
    # many short samples in a batch, few long ones
    sizes = {len(b): max(abs(lengths[i]) for i in b) for b in batches}
    assert max(sizes) > 2 * min(sizes)


def test_token_budget_sampler_same_length_every_epoch_ranks_cover_the_data():
    from vir.training.sampler import TokenBudgetBatchSampler

    lengths = _lengths(45, 18)
    samplers = [TokenBudgetBatchSampler(lengths, 300, world_size=2, rank=r, grad_accum=2, seed=3) for r in (0, 1)]
    orders = []
    for epoch in range(2):
        seen = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) and len(sampler) % 2 == 0
            seen += [i for b in batches for i in b]
        assert set(seen) == set(range(len(lengths)))  # the last step repeats a few batches, loses none
        orders.append(seen)
    assert orders[0] != orders[1]  # a new batch order each epoch
    again = TokenBudgetBatchSampler(lengths, 300, world_size=2, rank=0, grad_accum=2, seed=3)
    assert list(again) == list(TokenBudgetBatchSampler(lengths, 300, world_size=2, rank=0, grad_accum=2, seed=3))
    with pytest.raises(ValueError, match="rank 2"):
        TokenBudgetBatchSampler(lengths, 300, world_size=2, rank=2)
