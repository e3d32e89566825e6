"""`LlavaTrainer`: transformers' Trainer plus LLaVA's parameter groups and projector artifacts."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from vir.data.accounting import LEDGER_FILE, RecordLedger
from vir.models.checkpoint import write_run_artifacts
from vir.models.projector import PROJECTOR_FILE, load_projector_state_dict
from vir.training.checkpoints import STAGING_DIR, STATE_FILE, checkpoint_dirs, final_weight_files, publish
from vir.training.distributed import all_processes_agree, sum_array_over_processes
from vir.training.sampler import grouped_train_sampler, token_budget_sampler
from vir.utils.errors import UserError, write_failure

logger = logging.getLogger(__name__)

PROJECTOR_KEY = "mm_projector"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (out of disk, ...); the message names the intact previous one."""


class NonFiniteTrainingError(UserError):
    """Too many consecutive optimizer steps had non-finite gradients (`training.max_nonfinite_steps`)."""

VISION_TOWER_KEY = "vision_tower"


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    decay_names: set[str],
    learning_rate: float,
    weight_decay: float,
    mm_projector_lr: Optional[float] = None,
    vision_tower_lr: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """Split trainable parameters into optimizer groups (pure; unit-tested).

    Groups are keyed by (component, decay): the projector gets `mm_projector_lr`, the vision tower
    `vision_tower_lr`, everything else `learning_rate`; biases and norm weights (not in `decay_names`)
    get no weight decay. Empty groups are dropped; frozen parameters never appear.
    """
    lrs = {"projector": mm_projector_lr, "vision_tower": vision_tower_lr, "llm": None}
    buckets: Dict[tuple[str, bool], List[nn.Parameter]] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        if PROJECTOR_KEY in name:
            component = "projector"
        elif VISION_TOWER_KEY in name:
            component = "vision_tower"
        else:
            component = "llm"
        buckets.setdefault((component, name in decay_names), []).append(param)
    groups = []
    for (component, decay), params in sorted(buckets.items()):
        lr = lrs[component] if lrs[component] is not None else learning_rate
        groups.append(
            {
                "params": params,
                "lr": lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{component}{'' if decay else '_no_decay'}",
            }
        )
    return groups


class LlavaTrainer(Trainer):
    """Trainer with per-component learning rates and LLaVA artifacts in every save; training logs carry the
    train dataset's non-zero counters (`data/images_corrupt`, ...) when it has `stats()`.

    Extra keyword arguments: `image_processor` and `run_config` (the resolved Hydra config) are written
    next to the weights; `mm_projector_lr` / `vision_tower_lr` override the learning rate of those parts;
    `group_by_modality_length` batches multimodal and text-only samples apart (LLaVA's sampler); `length_grouping`
    > 1 (which implies it) also batches samples of similar length (megabatches of that many step batches);
    `record_ledger` counts the `record_events` of every batch that trains (and is saved in each checkpoint);
    `max_tokens_per_batch` cuts training micro-batches by tokens instead of samples (`TokenBudgetBatchSampler`;
    packed tokens when the collator packs, else padded ones).
    """

    def __init__(
        self,
        *args,
        image_processor=None,
        run_config=None,
        mm_projector_lr: Optional[float] = None,
        vision_tower_lr: Optional[float] = None,
        group_by_modality_length: bool = False,
        length_grouping: int = 1,
        record_ledger: Optional[RecordLedger] = None,
        max_nonfinite_steps: int = 10,
        max_tokens_per_batch: Optional[int] = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.group_by_modality_length = group_by_modality_length
        if length_grouping < 1:
            raise ValueError(f"training.length_grouping={length_grouping} must be >= 1")
        self.length_grouping = length_grouping
        self.max_tokens_per_batch = max_tokens_per_batch
        self.image_processor = image_processor
        self.run_config = run_config
        self.mm_projector_lr = mm_projector_lr
        self.vision_tower_lr = vision_tower_lr
        self._staging = False
        self.steps_at_start = 0  # the global step training started (or resumed) from
        self.record_ledger = record_ledger
        self.max_nonfinite_steps = max_nonfinite_steps
        self.nonfinite_streak = 0  # consecutive optimizer steps skipped for non-finite gradients
        self.nonfinite_total = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.max_tokens_per_batch and hasattr(dataset, "modality_lengths"):
            return token_budget_sampler(self.args, dataset.modality_lengths, self.max_tokens_per_batch,
                                        packed=getattr(self.data_collator, "packing", False))
        grouped = self.group_by_modality_length or self.length_grouping > 1
        if grouped and hasattr(dataset, "modality_lengths"):
            return grouped_train_sampler(self.args, dataset.modality_lengths, self.length_grouping)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        groups = build_param_groups(
            model.named_parameters(),
            set(self.get_decay_parameter_names(model)),
            learning_rate=self.args.learning_rate,
            weight_decay=self.args.weight_decay,
            mm_projector_lr=self.mm_projector_lr,
            vision_tower_lr=self.vision_tower_lr,
        )
        for group in groups:
            logger.info(
                "param group %-22s lr=%.2e wd=%.3g params=%d",
                group["name"],
                group["lr"],
                group["weight_decay"],
                sum(p.numel() for p in group["params"]),
            )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        self.optimizer.step = self._finite_step(self.optimizer)
        return self.optimizer

    def _finite_step(self, optimizer):
        """`optimizer.step` that skips (and warns about) an update whose gradients are not all finite on any
        process (under ZeRO each holds a different shard, so they agree through an all-reduce first). After
        `max_nonfinite_steps` consecutive skips it raises `NonFiniteTrainingError`: the checkpoints written so
        far are left as they are."""
        step = optimizer.step

        def guarded(*args, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            # Norms per dtype group (LoRA in bf16, the projector kept in fp32), compared in fp32.
            finite = not grads or bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)])
                                                      .sum()))
            if all_processes_agree(finite):
                self.nonfinite_streak = 0
                return step(*args, **kwargs)
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
            step_number = self.state.global_step + 1
            if self.nonfinite_streak > self.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"training stopped at step {step_number}: {self.nonfinite_streak} optimizer steps in a row had "
                    f"non-finite (NaN or inf) gradients (training.max_nonfinite_steps={self.max_nonfinite_steps}); "
                    f"the checkpoints in {self.args.output_dir} are intact. Lower training.learning_rate, use bf16 "
                    "rather than fp16, or check the data with vir-validate")
            logger.warning("step %d: non-finite gradients (NaN or inf loss); the update is skipped (%d in a row, "
                           "training.max_nonfinite_steps=%d)", step_number, self.nonfinite_streak,
                           self.max_nonfinite_steps)
            return None

        return guarded

    def training_step(self, model, inputs, num_items_in_batch=None):
        events = inputs.pop("record_events", None)  # counted here: this batch trains
        if events is not None and self.record_ledger is not None:
            self.record_ledger.add(events)
        return super().training_step(model, inputs, num_items_in_batch)

    def get_eval_dataloader(self, eval_dataset=None):
        with self._one_sample_per_row():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._one_sample_per_row():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _one_sample_per_row(self):
        """Evaluation batches are padded, never packed: the Trainer gathers predictions across processes row by
        row (equal row counts everywhere) and scores them per sample."""
        collator = self.data_collator
        if getattr(collator, "packing", False) and dataclasses.is_dataclass(collator):
            self.data_collator = dataclasses.replace(collator, packing=False)
        try:
            yield
        finally:
            self.data_collator = collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs.pop("record_events", None)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        # Done here, not in a callback's on_log: Trainer.log stores the history and calls the reporting
        # callbacks (tensorboard, wandb) before any user callback, so keys added there never reach them.
        if "loss" in logs and self.record_ledger is not None:  # what this process trained so far
            totals = self.record_ledger.totals()
            logs.update({f"data/{k}": v for k, v in totals.items() if v and k != "images_ok"})
        super().log(logs, start_time)

    def _saves_projector_only(self) -> bool:
        """True when only the projector trains and the run config names the base directories (stage1).

        Then, as in LLaVA's pre-training, a save is `mm_projector.bin` plus config, not another copy of the
        frozen LLM and tower: `load_run` rebuilds those from `model.llm.path` / `model.vision_tower.path`.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model_cfg = getattr(self.run_config, "model", None)
        if hasattr(model, "peft_config") or model_cfg is None:
            return False
        if not (model_cfg.llm.path and model_cfg.vision_tower.path):
            return False  # a random-init base cannot be rebuilt: keep the full weights
        return all(PROJECTOR_KEY in name for name, param in model.named_parameters() if param.requires_grad)

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        projector_only = self._saves_projector_only()
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if hasattr(model, "peft_config"):
            # peft's default ("auto") stores the whole embedding and lm_head in every adapter once the
            # vocabulary was resized (~2 GB per checkpoint for Llama-3-8B). LoRA never changes them and
            # `load_run` rebuilds the same mean-initialised rows, so the adapter alone is enough.
            model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False,
                                  is_main_process=self.args.should_save)
            if self.args.should_save:
                self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        elif not projector_only:
            super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        write_run_artifacts(
            output_dir,
            model,
            state_dict=state_dict,
            image_processor=self.image_processor,
            tokenizer=self.processing_class if projector_only else None,
            run_config=self.run_config,
        )
        if projector_only:
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into `.staging/` and renamed into place once complete; old ones
        are rotated out (`save_total_limit`) only after that, so a kill at any moment leaves the previous
        checkpoint whole and never a partial `checkpoint-N` that `auto` could pick up."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(run_dir / STAGING_DIR, ignore_errors=True)  # what a killed save left
        self.accelerator.wait_for_everyone()
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:  # out of disk, quota, a vanished mount: the previous checkpoint stays whole
            self.raise_write_failure(err, name, run_dir, staged=run_dir / STAGING_DIR)
        finally:
            self._staging = False
            self.args.save_total_limit = limit
        ledger = self.record_ledger.reduced(sum_array_over_processes) if self.record_ledger is not None else None
        self.accelerator.wait_for_everyone()  # every process's shards and RNG states are written
        if self.args.should_save:
            try:
                if ledger is not None:  # the run's total so far: a resumed run's data_stats.json counts it all
                    ledger.save(run_dir / STAGING_DIR / name / LEDGER_FILE)
                publish(run_dir / STAGING_DIR / name, run_dir / name)
            except Exception as err:
                self.raise_write_failure(err, name, run_dir, staged=run_dir / STAGING_DIR)
            best = self.state.best_model_checkpoint
            if best and Path(best).parent.name == STAGING_DIR:
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(run_dir / name / STATE_FILE))
            rotate_checkpoints(str(run_dir), save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def save_final(self, output_dir: Path) -> None:
        """The run's final artifacts at `output_dir`'s root (weights, projector, configs, `trainer_state.json`).
        A failed write (out of disk) removes the weights it began and raises `CheckpointWriteError`: the
        checkpoints stay, and `resume_from_checkpoint=auto` finishes the run from the newest one."""
        try:
            self.save_model(str(output_dir))
            self.save_state()
        except Exception as err:
            if self.args.should_save:
                for path in final_weight_files(output_dir):
                    path.unlink(missing_ok=True)
            self.raise_write_failure(err, "the final weights", output_dir)

    def raise_write_failure(self, err: Exception, what: str, run_dir: Path, staged: Optional[Path] = None,
                            storage_only: bool = False) -> None:
        """Re-raise `err` as one line naming what could not be written and the intact previous checkpoint, when
        it is a failed write (`write_failure`, `storage_only` as there); as it is otherwise. `staged` (a staging
        area) is removed."""
        reason = write_failure(err, run_dir, storage_only=storage_only)
        if staged is not None and self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        if reason is None:
            raise err
        previous = [p.name for p in checkpoint_dirs(run_dir)]
        raise CheckpointWriteError(
            f"cannot write {what} into {run_dir} ({reason}); "
            + (f"{previous[-1]} is intact: free space and re-run with training.resume_from_checkpoint=auto"
               if previous else "no earlier checkpoint exists")) from err

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        """The Trainer's, except that a run resumed from a checkpoint at `max_steps` trains no further step (the
        Trainer would take one more when `max_steps` is not a whole number of epochs): it only finishes."""
        epochs_trained, steps_in_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        self.steps_at_start = self.state.global_step
        if self.state.global_step >= max_steps:
            return max(epochs_trained, num_train_epochs), 0  # the epoch loop then runs no epoch
        return epochs_trained, steps_in_epoch

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Also restore `mm_projector.bin`: a peft adapter does not hold the projector, and projector-only
        (stage1) checkpoints hold nothing else, which the base Trainer refuses as "not a valid checkpoint"."""
        if not _is_projector_only(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_projector_if_saved(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not _is_projector_only(self.state.best_model_checkpoint):
            super()._load_best_model()
        _load_projector_if_saved(self.model, self.state.best_model_checkpoint)


def _is_projector_only(checkpoint: str) -> bool:
    """A checkpoint with `mm_projector.bin` and neither full weights nor an adapter."""
    directory = Path(checkpoint)
    weights = [*directory.glob("*.safetensors"), *directory.glob("pytorch_model*.bin"),
               *directory.glob("adapter_model.bin")]
    return (directory / PROJECTOR_FILE).is_file() and not weights


def _load_projector_if_saved(model: nn.Module, checkpoint: str) -> None:
    projector_file = Path(checkpoint) / PROJECTOR_FILE
    if projector_file.is_file():
        load_projector_state_dict(model, projector_file)
