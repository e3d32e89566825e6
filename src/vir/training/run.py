"""One training run from a composed config: build, set the mode, train, save LLaVA artifacts."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments, set_seed

from vir.data.accounting import LEDGER_FILE, RecordLedger
from vir.data.collator import DataCollatorForSupervisedDataset
from vir.data.conversation import IGNORE_INDEX
from vir.data.dataset import LazySupervisedDataset
from vir.data.templates import check_template
from vir.inference.generate import answer_predictor
from vir.models.builder import build_inputs, build_model
from vir.models.hf_import import apply_init_from_hf
from vir.training.batching import batch_layout
from vir.training.callbacks import CurvesCallback, DataStatsCallback, SampleVisualizerCallback
from vir.training.checkpoints import clear_finished, mark_finished
from vir.training.deepspeed_config import deepspeed_arguments
from vir.training.distributed import main_process_first, run_state
from vir.training.modes import apply_training_mode
from vir.training.ownership import Claim, claim_decision, clear_other_run, record_identity
from vir.training.preflight import check_output_dir, check_projector_fits, check_run, check_values
from vir.training.run_lock import run_dir_lock
from vir.training.trainer import LlavaTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    output_dir: Path
    global_step: int
    train_loss: float
    log_history: list
    data_stats: dict


def training_arguments(cfg: DictConfig, has_eval: bool) -> TrainingArguments:
    """HF TrainingArguments from the `training` section (extra_args passed through verbatim)."""
    t = cfg.training
    eval_steps = t.eval_steps if has_eval else None
    micro_batch, accumulation = batch_layout(t, run_state().num_processes)
    kwargs = dict(
        output_dir=t.output_dir,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=t.lr_scheduler_type,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        bf16=t.bf16,
        fp16=t.fp16,
        activation_checkpointing=t.gradient_checkpointing,
        report_to=list(t.report_to),
        remove_unused_columns=False,
        dataloader_num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    kwargs.update(deepspeed_arguments(t.deepspeed))
    kwargs.update(OmegaConf.to_container(t.extra_args, resolve=True))
    return TrainingArguments(**kwargs)


def preprocess_logits_for_metrics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Keep only the argmax ids during evaluation ([B, T] instead of [B, T, V])."""
    return logits.argmax(dim=-1)


def token_accuracy(eval_pred) -> dict:
    """Next-token accuracy on trained (label != -100) positions."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions, labels = np.asarray(predictions)[:, :-1], np.asarray(labels)[:, 1:]
    mask = labels != IGNORE_INDEX
    return {"token_accuracy": float((predictions[mask] == labels[mask]).mean()) if mask.any() else 0.0}


def history_train_loss(log_history: list) -> float:
    """The mean of the training losses a run logged (0.0 when it logged none)."""
    losses = [row["loss"] for row in log_history if "loss" in row]
    return float(np.mean(losses)) if losses else 0.0


def run_training(cfg: DictConfig, visualizer_samples: Optional[list] = None) -> TrainOutcome:
    """Train one stage as `cfg` says and write the final artifacts at `training.output_dir`'s root.

    The output directory belongs to this run (`vir.training.ownership`): a directory holding another run stops
    with one line, one holding this very run is resumed (`training.resume_from_checkpoint=auto`) or reported
    finished; the main process holds its lock (`vir.training.run_lock`) throughout. `visualizer_samples`
    (`EvalItem`s) enable the sample visualiser (callbacks.SampleVisualizerCallback): greedy answers with this
    run's tokenizer and image processor, `recipe.eval_max_new_tokens` at most.
    """
    os.environ.setdefault("WANDB_MODE", "offline")  # `wandb sync wandb/offline-run-*` uploads a run later
    os.environ.setdefault("WANDB_PROJECT", "vir")
    set_seed(cfg.seed)
    state = run_state()
    check_output_dir(cfg.training.output_dir, probe=state.is_main_process)
    output_dir = Path(cfg.training.output_dir)
    check_values(cfg)  # a NaN or an unknown name is reported as itself, not as "another run"
    with run_dir_lock(output_dir) if state.is_main_process else contextlib.nullcontext():
        claim = claim_decision(cfg, output_dir, state.num_processes)  # reading only, before anything is written
        state.wait_for_everyone()  # every process decided before the main one writes
        with main_process_first():  # model.init_from_hf: split a transformers Llava directory into our bases
            apply_init_from_hf(cfg)
        check_run(cfg)
        if claim.finished is not None:
            done = claim.finished
            logger.info("%s already finished this run (step %d): nothing to train", output_dir, done["global_step"])
            return TrainOutcome(output_dir, done["global_step"], done["train_loss"], done["log_history"],
                                done["data_stats"])
        return _train(cfg, output_dir, claim, visualizer_samples)


def _train(cfg: DictConfig, output_dir: Path, claim: Claim, visualizer_samples: Optional[list]) -> TrainOutcome:
    resume = claim.resume
    tokenizer, image_processor, model_config = build_inputs(cfg)
    check_template(cfg.data.template, tokenizer)  # its special tokens are in this LLM's tokenizer
    check_projector_fits(cfg, model_config)
    datasets = {
        split: LazySupervisedDataset.from_config(cfg.data, split, tokenizer, image_processor,
                                                 num_image_tokens=model_config.num_image_tokens,
                                                 model_max_length=cfg.model.model_max_length,
                                                 image_token=cfg.model.image_token)
        for split in ("train", "eval")
        if getattr(cfg.data, f"{split}_path")
    }
    if "train" not in datasets:
        raise ValueError("data.train_path is not set: nothing to train on")
    datasets["train"].check_trainable("data.train_path")  # before any weights load, and before any artifact
    model = build_model(cfg.model, tokenizer, image_aspect_ratio=cfg.data.image_aspect_ratio)
    model = apply_training_mode(model, cfg.training, vision_tower_freeze=cfg.model.vision_tower.freeze)
    if cfg.training.gradient_checkpointing:
        model.enable_input_require_grads()
    ledger = RecordLedger(len(datasets["train"]))
    if resume and (Path(resume) / LEDGER_FILE).is_file() and run_state().is_main_process:
        ledger.load(Path(resume) / LEDGER_FILE)  # the run's counts so far (the main process holds the total)
    stats_callback = DataStatsCallback(datasets["train"], ledger, output_dir)
    callbacks = [stats_callback, CurvesCallback(output_dir)]
    if visualizer_samples:
        predict = answer_predictor(tokenizer, image_processor, cfg.data, cfg.recipe.eval_max_new_tokens)
        callbacks.append(SampleVisualizerCallback(visualizer_samples, predict, output_dir))
    trainer = LlavaTrainer(
        model=model,
        args=training_arguments(cfg, has_eval="eval" in datasets),
        train_dataset=datasets["train"],
        eval_dataset=datasets.get("eval"),
        data_collator=DataCollatorForSupervisedDataset(tokenizer.pad_token_id, keep_record_events=True,
                                                       packing=cfg.data.packing,
                                                       pack_row_tokens=cfg.data.pack_row_tokens),
        processing_class=tokenizer,
        callbacks=callbacks,
        compute_metrics=token_accuracy if "eval" in datasets else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if "eval" in datasets else None,
        image_processor=image_processor,
        run_config=cfg,
        mm_projector_lr=cfg.training.mm_projector_lr,
        vision_tower_lr=cfg.training.vision_tower_lr,
        group_by_modality_length=cfg.training.group_by_modality_length,
        length_grouping=cfg.training.length_grouping,
        record_ledger=ledger,
        max_nonfinite_steps=cfg.training.max_nonfinite_steps,
        max_tokens_per_batch=cfg.training.max_tokens_per_batch,
    )
    if trainer.args.should_save:
        if claim.replace:
            clear_other_run(output_dir)
        record_identity(output_dir, claim.identity)
        clear_finished(output_dir)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except Exception as err:  # what a callback writes at the end (data_stats.json, curves.png) on a full disk
        trainer.raise_write_failure(err, "the run's records", output_dir, storage_only=True)
    trainer.save_final(output_dir)
    # A run resumed from its last checkpoint trains no step (LlavaTrainer): its loss is the history's.
    trained_here = trainer.state.global_step > trainer.steps_at_start
    outcome = TrainOutcome(output_dir, trainer.state.global_step,
                           result.training_loss if trained_here else history_train_loss(trainer.state.log_history),
                           trainer.state.log_history, stats_callback.totals)
    if trainer.args.should_save:  # last: re-running with resume_from_checkpoint=auto skips a finished run
        mark_finished(output_dir, {"global_step": outcome.global_step, "train_loss": outcome.train_loss,
                                   "log_history": outcome.log_history, "data_stats": outcome.data_stats})
    trainer.accelerator.wait_for_everyone()  # the next stage (any process) reads what the main one wrote
    return outcome
