"""Trainer callbacks: a sample visualiser (PNG grid + wandb.Table), loss/accuracy curves, data counters."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Callable, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from vir.data.accounting import RecordLedger  # noqa: E402
from vir.inference.scoring import exact_match  # noqa: E402
from vir.training.distributed import sum_array_over_processes  # noqa: E402

logger = logging.getLogger(__name__)


class SampleVisualizerCallback(TrainerCallback):
    """Greedy answers for K fixed validation samples at every evaluation and at the end of training.

    Always writes `samples/step-N.png` into the run directory; logs a `wandb.Table` (image, prompt,
    prediction, reference) when a wandb run is active. `predict(model, samples) -> list[str]` does the
    generation (`vir.inference.generate.generate_answers` bound to the run's tokenizer and processor).
    """

    def __init__(self, samples: Sequence, predict: Callable, output_dir: str | Path):
        self.samples = list(samples)
        self.predict = predict
        self.output_dir = Path(output_dir)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._visualise(model, state.global_step, args)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._visualise(model, state.global_step, args)

    def _visualise(self, model, step: int, args) -> None:
        if model is None or not self.samples or not args.should_save:
            return
        predictions = self.predict(model, self.samples)
        path = self.output_dir / "samples" / f"step-{step}.png"
        write_sample_grid(path, self.samples, predictions, title=f"step {step}")
        logger.info("wrote %s", path)
        _log_wandb_table(self.samples, predictions, step)


def write_sample_grid(path: Path, samples: Sequence, predictions: Sequence[str], title: str = "") -> Path:
    """PNG grid: each cell the sample's first image with prompt, prediction (✓/✗) and reference."""
    n = len(samples)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    # Constrained layout keeps each row's three title lines above its images (tight_layout let them overlap
    # the row above).
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, sample, prediction in zip(axes.flat, samples, predictions):
        if sample.query.images:
            ax.imshow(sample.query.images[0])
        ok = exact_match(prediction, sample.reference)
        prompt = sample.query.messages[-1].content.replace("<image>", "").strip()
        ax.set_title(f"{_wrap(prompt)}\npred: {_wrap(prediction)}\nref: {_wrap(sample.reference)}",
                     fontsize=7, color="darkgreen" if ok else "darkred")
    if title:
        fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 40) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in text)  # untrained models emit control bytes
    return text if len(text) <= width else text[: width - 1] + "…"


def _log_wandb_table(samples: Sequence, predictions: Sequence[str], step: int) -> None:
    """Log the samples to the active wandb run, if any: a `wandb.Table` (image, prompt, prediction, reference)
    and the images themselves with "pred / ref" captions (an offline run keeps those under files/media/images;
    the table's cells go through an artifact)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    table = wandb.Table(columns=["image", "prompt", "prediction", "reference"])
    images = []
    for sample, prediction in zip(samples, predictions):
        image = wandb.Image(sample.query.images[0]) if sample.query.images else None
        table.add_data(image, sample.query.messages[-1].content, prediction, sample.reference)
        if sample.query.images:
            images.append(wandb.Image(sample.query.images[0], caption=f"pred: {prediction} / ref: {sample.reference}"))
    # No `step=`: transformers' WandbCallback advances wandb's own step and plots against train/global_step.
    wandb.log({"samples": table, **({"sample_images": images} if images else {}), "train/global_step": step})


class CurvesCallback(TrainerCallback):
    """At the end of training, `curves.png`: train/eval loss and eval token accuracy over steps."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save:
            write_curves(self.output_dir / "curves.png", state.log_history)


def write_curves(path: Path, log_history: List[dict]) -> Path:
    """Plot `loss`, `eval_loss` and any `eval_*accuracy*` series from a Trainer log history."""
    series = {"train loss": "loss", "eval loss": "eval_loss"}
    accuracy_keys = sorted({k for row in log_history for k in row if k.startswith("eval_") and "accuracy" in k})
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, key in series.items():
        points = [(row["step"], row[key]) for row in log_history if key in row]
        if points:
            ax_loss.plot(*zip(*points), label=label, marker="." if len(points) < 30 else None)
    for key in accuracy_keys:
        points = [(row["step"], row[key]) for row in log_history if key in row]
        ax_acc.plot(*zip(*points), label=key.removeprefix("eval_"), marker=".")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="eval accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


class DataStatsCallback(TrainerCallback):
    """At the end of training, prints what trained, per record (`vir.data.accounting`: records trained,
    truncated and skipped, fallback images by status, each with the records' ids) and writes `data_stats.json`,
    beside the records the file held but training excluded: a run never hides that it trained on black images.
    (`LlavaTrainer.log` puts the same counts in the training logs: keys added in `on_log` would miss tensorboard
    and wandb.)"""

    def __init__(self, dataset, ledger: RecordLedger, output_dir: str | Path):
        self.dataset = dataset
        self.ledger = ledger
        self.output_dir = Path(output_dir)
        self.totals: dict = {}  # data_stats.json's content, once training has ended

    def on_train_end(self, args, state, control, **kwargs):
        ledger = self.ledger.reduced(sum_array_over_processes)  # each process trained its share
        summary = ledger.summary(self.dataset.record_id, self.dataset.skip_reason)
        counts = {k: v for k, v in summary.items() if isinstance(v, int)}
        message = ", ".join(f"{k}={v}" for k, v in counts.items())
        fallback = sum(counts[k] for k in counts if k.startswith("images_") and k != "images_ok")
        (logger.warning if fallback or counts["skipped"] else logger.info)("trained data: %s", message)
        # Every record the file holds but training excluded, by id and reason (the warning names only a few).
        excluded = [{"id": rid, "reason": why} for rid, why in self.dataset.invalid_records]
        self.totals = {**summary, "records": self.dataset.num_records_total,
                       "records_without_id": self.dataset.records_without_id,
                       "duplicate_ids": self.dataset.duplicate_ids, "invalid_records": excluded,
                       "unanswered_final_turn": list(self.dataset.unanswered_records)}
        if args.should_save:
            print(f"trained data: {message}" + (f"; {len(excluded)} invalid records excluded" if excluded else ""))
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "data_stats.json").write_text(json.dumps(self.totals, indent=2))
