"""Packed, token-budget batches through vir-train's path: every record trains once per epoch, nothing is lost,
the loss falls, and the packed batches hold almost no padding."""

from __future__ import annotations

import json
import math

import pytest
from training_fixtures import run_config, tiny_bases, train

from vir.data.dataset import LazySupervisedDataset


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    bases = tiny_bases(tmp_path_factory)
    batches = []
    cfg = run_config(bases, tmp_path_factory.mktemp("packed"), "stage2_full", "data.packing=true",
                     "data.pack_row_tokens=150", "training.max_tokens_per_batch=400",
                     "training.num_train_epochs=2")
    import vir.training.run as run_module

    collator_class = run_module.DataCollatorForSupervisedDataset

    class Recording(collator_class):
        def __call__(self, instances):
            batch = super().__call__(instances)
            batches.append((len(instances), batch))
            return batch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "DataCollatorForSupervisedDataset", Recording)
        run = train(cfg)
    return bases, cfg, run, batches


def test_every_record_trains_once_per_epoch_in_packed_token_budget_batches(packed_run):
    bases, cfg, run, batches = packed_run
    records = len(json.loads(bases.data.train.read_text()))
    stats = json.loads((run.output_dir / "data_stats.json").read_text())
    # two epochs, each record once per epoch (the last step may repeat a few batches to fill itself)
    assert 2 * records <= stats["samples_trained"] < 2 * records + 8
    assert stats["records_trained"] == records
    sizes = [n for n, _ in batches]
    assert len(set(sizes)) > 1  # a token budget, not a sample count
    for _, batch in batches:
        assert "attention_mask" not in batch and "position_ids" in batch
        assert batch["input_ids"].shape[1] <= 150 or batch["input_ids"].shape[0] == 1  # rows of <= 150
    history = [row["loss"] for row in run.outcome.log_history if "loss" in row]
    assert all(math.isfinite(loss) for loss in history) and history[-1] < history[0]


def test_packed_batches_waste_little(packed_run):
    bases, cfg, run, batches = packed_run
    pad = run.trainer.processing_class.pad_token_id
    real = sum(int((b["input_ids"] != pad).sum()) for _, b in batches)
    total = sum(b["input_ids"].numel() for _, b in batches)
    assert 1 - real / total < 0.05
    # the same records padded per batch of 8 (the sample-count default) waste far more
    dataset = LazySupervisedDataset(bases.data.train, run.trainer.processing_class, run.trainer.image_processor,
                                    num_image_tokens=run.model.config.num_image_tokens, image_folder=bases.data.root)
    lengths = [abs(n) for n in dataset.modality_lengths]
    padded = sum(8 * max(lengths[i:i + 8]) for i in range(0, len(lengths), 8))
    assert 1 - sum(lengths) / padded > 2 * (1 - real / total)


def test_evaluation_batches_stay_padded_one_sample_per_row(packed_run):
    """Predictions are gathered across processes row by row: packed eval rows (a different count on each
    process) would break the gather, so only training batches pack."""
    bases, cfg, run, _ = packed_run
    trainer = run.trainer
    assert trainer.data_collator.packing
    train_batch = next(iter(trainer.get_train_dataloader()))
    eval_batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    assert "position_ids" in train_batch and "attention_mask" not in train_batch
    assert "attention_mask" in eval_batch and "position_ids" not in eval_batch
    assert eval_batch["input_ids"].shape[0] == trainer.args.per_device_eval_batch_size
    assert trainer.data_collator.packing  # restored for training
