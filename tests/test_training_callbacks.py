"""Callbacks: sample grids at every evaluation and at the end, curves.png, data counters in data_stats.json."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from training_fixtures import lora_run, run_config, stage1_run, tiny_bases, train

from vir.inference.evaluate import load_eval_items
from vir.training.callbacks import SampleVisualizerCallback, write_curves, write_sample_grid


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


def test_visualiser_writes_a_grid_per_evaluation_and_curves_at_the_end(tmp_path_factory):
    run = lora_run(tmp_path_factory)  # eval (and so the visualiser) at step 2, the last step
    grids = sorted(p.name for p in (run.output_dir / "samples").iterdir())
    assert grids == ["step-2.png"]
    with Image.open(run.output_dir / "samples" / "step-2.png") as grid:
        assert grid.width > 200 and grid.height > 100
    assert (run.output_dir / "curves.png").is_file()
    history = run.outcome.log_history
    assert [row["step"] for row in history if "loss" in row] == [1, 2]
    assert any("eval_token_accuracy" in row and 0 <= row["eval_token_accuracy"] <= 1 for row in history)


def test_visualiser_callback_alone(tmp_path, bases):
    items = load_eval_items(bases.data.eval, bases.data.root)[:2]
    seen = []

    def predict(model, samples):
        seen.append((model, len(samples)))
        return ["yes"] * len(samples)

    callback = SampleVisualizerCallback(items, predict, tmp_path)
    args, model = SimpleNamespace(should_save=True), torch.nn.Linear(1, 1)
    callback.on_evaluate(args, SimpleNamespace(global_step=3), None, model=model)
    callback.on_train_end(args, SimpleNamespace(global_step=7), None, model=model)
    callback.on_evaluate(SimpleNamespace(should_save=False), SimpleNamespace(global_step=9), None, model=model)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-3.png", "step-7.png"]
    assert seen == [(model, 2), (model, 2)]  # non-main ranks (should_save False) do not generate


def test_data_stats_count_the_broken_images_of_one_epoch(tmp_path_factory, bases):
    run = stage1_run(tmp_path_factory)  # exactly one epoch over the 40 train records
    broken = [b for b in json.loads(bases.data.manifest.read_text())["broken"] if b["id"].startswith("train")]
    assert sorted(b["kind"] for b in broken) == ["empty", "missing", "truncated"]
    stats = json.loads((run.output_dir / "data_stats.json").read_text())
    num_images = json.loads(bases.data.manifest.read_text())["counts"]["train"]["images"]
    assert stats == run.outcome.data_stats
    assert stats["images_missing"] == 1 and stats["images_corrupt"] == 2  # the empty and the truncated file
    assert stats["images_ok"] == num_images - 3
    assert stats["images_refused"] == stats["skipped"] == 0
    assert stats["samples_trained"] == stats["records_trained"] == 40
    assert sorted(row["id"] for row in stats["fallback_image_records"]) == sorted(b["id"] for b in broken)
    # The counts also reach the training logs (only non-zero ones, so tensorboard/wandb see them too).
    logged = [row.get("data/records_trained", 0) for row in run.outcome.log_history if "loss" in row]
    assert logged == [8, 16, 24, 32, 40]
    assert [row.get("data/images_corrupt", 0) for row in run.outcome.log_history if "loss" in row][-1] == 2


def test_data_stats_count_records_once_over_epochs_workers_and_prefetching(tmp_path, bases):
    """Two epochs through two DataLoader workers (which prefetch batches that never train past max_steps): every
    record counted once, every trained sample once, each broken image once."""
    run = train(run_config(bases, tmp_path / "run", "stage1", "training.max_steps=9", "data.num_workers=2"))
    stats = run.outcome.data_stats
    broken = [b for b in json.loads(bases.data.manifest.read_text())["broken"] if b["id"].startswith("train")]
    assert stats["samples_trained"] == 9 * 8 and stats["records_trained"] == 40  # the second epoch: 4 of 5 steps
    assert stats["images_missing"] == 1 and stats["images_corrupt"] == 2
    assert {row["id"]: {k: v for k, v in row.items() if k != "id"} for row in stats["fallback_image_records"]} == {
        b["id"]: {"missing" if b["kind"] == "missing" else "corrupt": 1} for b in broken}


def test_write_sample_grid_and_curves_directly(tmp_path, bases):
    items = load_eval_items(bases.data.eval, bases.data.root)[:3]
    predictions = [items[0].reference, "\x07 garbage \x00", ""]  # untrained models emit control bytes
    grid = write_sample_grid(tmp_path / "deep" / "grid.png", items, predictions, title="step 0")
    image = Image.open(grid).convert("RGB")
    assert image.size[0] >= 3 * 32  # one tile per item, each at least the image's own width
    assert len(set(image.getdata())) > 10  # images and text were drawn, not a blank canvas
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7, "eval_token_accuracy": 0.4}]
    assert write_curves(tmp_path / "curves.png", history).is_file()
    assert write_curves(tmp_path / "empty.png", []).is_file()


def test_visualiser_logs_a_wandb_table_and_images_to_an_offline_run(tmp_path, monkeypatch, bases):
    """The seed's WandB visualiser, in offline mode: the table's rows and the sample images are in the run's files."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    items = load_eval_items(bases.data.eval, bases.data.root)[:3]
    callback = SampleVisualizerCallback(items, lambda model, samples: ["pred-" + s.id for s in samples], tmp_path)
    run = wandb.init(mode="offline", dir=str(tmp_path), project="vir-test")
    try:
        callback._visualise(object(), step=7, args=SimpleNamespace(should_save=True))
    finally:
        wandb.finish()
    files = next((tmp_path / "wandb").glob(f"offline-run-*-{run.id}")) / "files" / "media"
    (table_file,) = (files / "table").glob("samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["image", "prompt", "prediction", "reference"]
    assert [row[2] for row in table["data"]] == [f"pred-{item.id}" for item in items]
    assert [row[3] for row in table["data"]] == [item.reference for item in items]
    assert len(list((files / "images").glob("sample_images_*.png"))) == sum(bool(i.query.images) for i in items) > 0
    assert (tmp_path / "samples" / "step-7.png").is_file()
