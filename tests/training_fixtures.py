"""Helpers shared by tests/test_training_*.py and tests/test_inference_*.py (plain functions: import them).

Everything expensive (synthetic data, tiny base directories, short training runs) is built once per test
session: each test module wraps these in `scope="session"` fixtures, and the functions themselves cache on the
session's `tmp_path_factory`, so two modules asking for the same thing share one copy.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
)

from vir.data.collator import DataCollatorForSupervisedDataset
from vir.data.dataset import LazySupervisedDataset
from vir.demo.synthetic import SyntheticPaths, generate
from vir.models.projector import projector_state_dict
from vir.training import run as run_module
from vir.training.run import TrainOutcome, run_training
from vir.training.trainer import LlavaTrainer
from vir.utils.config import compose_config

# 40 train records hold the 3 broken images, a few text-only and multi-turn records; one epoch is 5 steps of 8.
SYNTHETIC_SIZES = {"num_stage1": 40, "num_train": 40, "num_eval": 8, "num_test": 8}
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 image tokens per image
LLM_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)
VISION_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)


@dataclass(frozen=True)
class Bases:
    """Tiny random "pretrained" bases saved as local HF directories (run-dir reload rebuilds from them)."""

    data: SyntheticPaths
    llm: Path
    clip: Path


def _once_per_session(build):
    """Cache `build(factory)` per `tmp_path_factory` (one per session; the factory itself is unhashable)."""
    cache: dict = {}

    @functools.wraps(build)
    def cached(factory: pytest.TempPathFactory):
        if id(factory) not in cache:
            cache[id(factory)] = (factory, build(factory))  # holding the factory keeps its id unique
        return cache[id(factory)][1]

    return cached


@_once_per_session
def synthetic_data(factory: pytest.TempPathFactory) -> SyntheticPaths:
    return generate(factory.mktemp("synthetic"), dict(SYNTHETIC_SIZES))


@_once_per_session
def tiny_bases(factory: pytest.TempPathFactory) -> Bases:
    """A random 2-layer Llama (hidden 32) + the synthetic tokenizer, and a random CLIP tower (32 px, 8 px
    patches) + its image processor, each saved as a local directory."""
    data = synthetic_data(factory)
    tokenizer = AutoTokenizer.from_pretrained(str(data.tokenizer))
    llm_dir, clip_dir = factory.mktemp("base_llm"), factory.mktemp("base_clip")
    torch.manual_seed(0)
    # initializer_range 0.1 (not 0.02): behind the final RMSNorm, a frozen lm_head of std 0.02 caps every logit
    # below ~0.7, so no projector or LoRA could lower the loss much; 0.1 lets short runs show learning.
    config = LlamaConfig(vocab_size=len(tokenizer), initializer_range=0.1, **LLM_SIZES)
    LlamaForCausalLM(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(**VISION_SIZES)).save_pretrained(clip_dir)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                          crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(clip_dir)
    return Bases(data, llm_dir, clip_dir)


def run_config(bases: Bases, output_dir: Path, mode: str, *extra: str, with_eval: bool = False):
    """The shipped config composed for a tiny CPU run on the synthetic data and the tiny bases.

    The experiment (the embedded default's tuning) is dropped and every value a test relies on is pinned, so
    retuning the shipped experiment or training groups cannot change what these tests check.
    """
    return compose_config(run_overrides(bases, output_dir, mode, *extra, with_eval=with_eval))


def run_overrides(bases: Bases, output_dir: Path, mode: str, *extra: str, with_eval: bool = False) -> List[str]:
    """`run_config`'s command-line overrides (what `vir-train` takes for the same run)."""
    data = bases.data
    overrides = [
        "model=tiny",
        f"training={mode}",
        f"data.train_path={data.train}",
        f"data.image_folder={data.root}",
        "data.template=llama3",
        f"model.llm.path={bases.llm}",
        f"model.vision_tower.path={bases.clip}",
        "model.vision_tower.select_layer=-2",
        "model.vision_tower.freeze=true",
        "model.projector_type=mlp2x_gelu",
        "model.model_max_length=512",
        f"training.output_dir={output_dir}",
        "training.num_train_epochs=1",
        "training.max_steps=-1",
        "training.save_steps=500",
        "training.eval_steps=null",
        "training.per_device_train_batch_size=8",
        "training.per_device_eval_batch_size=8",
        "training.gradient_accumulation_steps=1",
        "training.group_by_modality_length=false",
        "training.logging_steps=1",
        "training.report_to=[]",
        "training.learning_rate=1e-3",
        "training.mm_projector_lr=null",
        "training.vision_tower_lr=null",
        "training.weight_decay=0.0",
        "training.warmup_ratio=0.0",
        "training.lr_scheduler_type=cosine",
        "training.lora_r=8",
        "training.lora_alpha=16",
        "training.lora_dropout=0.0",
        "seed=42",
    ]
    if with_eval:
        overrides.append(f"data.eval_path={data.eval}")
    return [*overrides, *extra]


class _SnapshotOnSave(TrainerCallback):
    """Keeps a CPU copy of the whole (peft) model's state dict at every save, keyed by global step."""

    def __init__(self, snapshots: Dict[int, dict]):
        self.snapshots = snapshots

    def on_save(self, args, state, control, model=None, **kwargs):
        self.snapshots[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class TrainedRun:
    """A finished `run_training` call plus the live trainer (model, optimizer) and per-save snapshots."""

    cfg: object
    outcome: TrainOutcome
    trainer: LlavaTrainer
    snapshots: Dict[int, dict]
    initial_projector: Dict[str, torch.Tensor]  # mm_projector.bin layout, before the first step

    @property
    def output_dir(self) -> Path:
        return self.outcome.output_dir

    @property
    def model(self):
        return self.trainer.model


def train(cfg, visualizer_samples: Optional[list] = None) -> TrainedRun:
    """`run_training(cfg)` with its LlavaTrainer captured (run_training returns no model)."""
    captured: List[LlavaTrainer] = []
    snapshots: Dict[int, dict] = {}
    initial: Dict[str, torch.Tensor] = {}

    class RecordingTrainer(LlavaTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(_SnapshotOnSave(snapshots))
            initial.update(projector_state_dict(self.model))
            captured.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "LlavaTrainer", RecordingTrainer)
        outcome = run_training(cfg, visualizer_samples=visualizer_samples)
    return TrainedRun(cfg, outcome, captured[0], snapshots, initial)


def trainer_with(callback: TrainerCallback) -> type:
    """A LlavaTrainer class that also runs `callback` (after the run's own): patch it over
    `vir.training.run.LlavaTrainer` to act at a chosen moment of a real run (a kill, a full disk)."""

    class Trainer(LlavaTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(callback)

    return Trainer


def vir_train(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, overrides: List[str]):
    """Run `vir-train OVERRIDES` in-process as the console script does; returns (exit status, its stderr)."""
    from vir.cli import train as train_cli

    monkeypatch.setattr(sys, "argv", ["vir-train", *overrides])
    capsys.readouterr()  # what the test printed before
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main()
    return exit_info.value.code, capsys.readouterr().err


def vir_train_fails(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, overrides: List[str]) -> str:
    """`vir_train` that must stop with exit status 2 and one line, no traceback; returns that line."""
    code, err = vir_train(monkeypatch, capsys, overrides)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def mixed_batch(bases: Bases, tokenizer, image_processor, num_image_tokens: int) -> dict:
    """A collated batch of 5 train records: 3 with an image and 2 text-only, interleaved, right-padded."""
    dataset = LazySupervisedDataset(bases.data.train, tokenizer, image_processor,
                                    num_image_tokens=num_image_tokens, image_folder=bases.data.root)
    with_images = [i for i, n in enumerate(dataset.modality_lengths) if n > 0][:3]
    text_only = [i for i, n in enumerate(dataset.modality_lengths) if n < 0][:2]
    indices = [with_images[0], text_only[0], with_images[1], with_images[2], text_only[1]]
    batch = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)([dataset[i] for i in indices])
    assert batch["pixel_values"].shape[0] == 3 and (batch["input_ids"] == tokenizer.pad_token_id).any()
    return batch


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"]).logits
    model.train(was_training)
    return out


@_once_per_session
def lora_run(factory: pytest.TempPathFactory) -> TrainedRun:
    """stage2_lora, 2 steps, a checkpoint each step, eval + sample visualiser at step 2, projector lr 3e-3."""
    from vir.inference.evaluate import load_eval_items

    bases = tiny_bases(factory)
    cfg = run_config(bases, factory.mktemp("run_lora"), "stage2_lora", "training.max_steps=2",
                     "training.save_steps=1", "training.eval_steps=2", "training.mm_projector_lr=3e-3",
                     with_eval=True)
    samples = load_eval_items(bases.data.eval, bases.data.root)[:4]
    return train(cfg, visualizer_samples=samples)


@_once_per_session
def stage1_run(factory: pytest.TempPathFactory) -> TrainedRun:
    """stage1 for one whole epoch of the 40 train records (5 steps of 8), a checkpoint every 2 steps."""
    cfg = run_config(tiny_bases(factory), factory.mktemp("run_stage1"), "stage1", "training.num_train_epochs=1",
                     "training.save_steps=2")
    return train(cfg)


@_once_per_session
def full_run(factory: pytest.TempPathFactory) -> TrainedRun:
    """stage2_full, 2 steps, unfrozen tower, per-component learning rates and weight decay."""
    cfg = run_config(tiny_bases(factory), factory.mktemp("run_full"), "stage2_full", "training.max_steps=2",
                     "training.save_steps=1", "model.vision_tower.freeze=false", "training.mm_projector_lr=1e-2",
                     "training.vision_tower_lr=1e-5", "training.weight_decay=0.1")
    return train(cfg)


RUNS = {"stage1": stage1_run, "stage2_lora": lora_run, "stage2_full": full_run}
