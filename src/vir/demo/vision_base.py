"""A from-scratch "pretrained" CLIP vision tower for the synthetic task: dense per-patch supervision.

No pretrained CLIP exists offline, and a tower trained from scratch only through the LLM stays blind. So,
standing in for CLIP's own pretraining, a random-init `CLIPVisionModel` learns with one linear head per
target on every patch of `hidden_states[select_layer]` (CLS dropped), the very features LLaVA consumes:
each cell's occupied / colour / shape / size and its row / column. Images go through the same
`CLIPImageProcessorPil` and `preprocess_images` as training, so the tower never sees another distribution.

    metrics = pretrain_vision_tower("runs/bases/clip", spec, cfg.model.vision_tower, cfg.demo.bases.vision)
    CLIPVisionModel.from_pretrained("runs/bases/clip"); CLIPImageProcessorPil.from_pretrained(...)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import CLIPImageProcessorPil, CLIPVisionModel, Trainer

from vir.data.images import preprocess_images
from vir.demo.common import (
    PathLike,
    StepRecords,
    as_dataclass,
    clear_metrics,
    fingerprint,
    finished_metrics,
    pretrain_arguments,
    refuse_mismatch,
    write_metrics,
)
from vir.demo.config import SyntheticConfig, VisionPretrainConfig
from vir.demo.synthetic import SIZES, as_spec, labelled_scene
from vir.models.model_config import vision_config_from_sizes
from vir.models.image_processors import clip_image_processor
from vir.training.distributed import run_state
from vir.utils.config_schema import VisionTowerConfig

logger = logging.getLogger(__name__)

# Dense targets, in the column order of `dense_labels`; colour/shape/size are -1 (ignored) on empty cells.
DENSE_HEADS = ("occupied", "colour", "shape", "size", "row", "column")
_TRAIN_STREAM, _EVAL_STREAM = 0, 1
_SAVED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def build_clip_vision(tower: VisionTowerConfig) -> CLIPVisionModel:
    """A random-init `CLIPVisionModel` with the size fields of `model.vision_tower` (its `path` is ignored)."""
    return CLIPVisionModel(vision_config_from_sizes(tower))


def dense_labels(cell_labels: np.ndarray, grid: int) -> np.ndarray:
    """`cell_labels` [grid*grid, 4] -> int64 [grid*grid, 6] with the row and column (0-based) appended."""
    cells = np.arange(grid * grid)
    return np.concatenate([cell_labels, (cells // grid)[:, None], (cells % grid)[:, None]], axis=1)


def render_bank(
    spec: SyntheticConfig, processor: CLIPImageProcessorPil, n: int, seed: int, stream: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`n` on-the-fly scenes -> (`pixel_values` [n, 3, H, W] float32, labels [n, grid*grid, 6] int64)."""
    rng = np.random.default_rng([seed, spec.seed, stream])
    pixels, labels = [], []
    for start in range(0, n, 256):
        pairs = [labelled_scene(rng, spec) for _ in range(min(256, n - start))]
        pixels.append(preprocess_images([image for image, _ in pairs], processor, "pad"))
        labels.extend(dense_labels(cells, spec.grid) for _, cells in pairs)
    return torch.cat(pixels), torch.from_numpy(np.stack(labels))


class DenseHeads(nn.Module):
    """One linear classifier per `DENSE_HEADS` entry: features [B, P, D] -> {head: logits [B, P, classes]}."""

    def __init__(self, hidden_size: int, spec: SyntheticConfig):
        super().__init__()
        classes = (2, len(spec.colours), len(spec.shapes), len(SIZES), spec.grid, spec.grid)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, k) for name, k in zip(DENSE_HEADS, classes)})

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: head(features) for name, head in self.heads.items()}


def patch_features(model: CLIPVisionModel, pixel_values: torch.Tensor, select_layer: int) -> torch.Tensor:
    """[B, 3, H, W] -> `hidden_states[select_layer]` without CLS, [B, P, D]: what LLaVA's projector reads."""
    hidden_states = model(pixel_values, output_hidden_states=True).hidden_states
    return hidden_states[select_layer][:, 1:]


def dense_loss(logits: Dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over heads of the mean cross-entropy over labelled cells; labels [B, P, 6], -1 = ignored."""
    return sum(
        F.cross_entropy(logits[name].flatten(0, 1), labels[..., k].flatten(), ignore_index=-1)
        for k, name in enumerate(DENSE_HEADS)
    )


@torch.no_grad()
def dense_accuracy(
    model: CLIPVisionModel, heads: DenseHeads, pixels: torch.Tensor, labels: torch.Tensor, select_layer: int
) -> Dict[str, float]:
    """Per-head accuracy over labelled cells, plus `object` (every attribute of an occupied cell right)."""
    model.eval()
    correct = {name: 0 for name in DENSE_HEADS}
    counts = {name: 0 for name in DENSE_HEADS}
    objects_right = objects = 0
    for start in range(0, len(pixels), 256):
        batch_labels = labels[start : start + 256].to(model.device)
        logits = heads(patch_features(model, pixels[start : start + 256].to(model.device), select_layer))
        hits = torch.stack([logits[name].argmax(-1) == batch_labels[..., k] for k, name in enumerate(DENSE_HEADS)], -1)
        valid = batch_labels >= 0
        for k, name in enumerate(DENSE_HEADS):
            correct[name] += int((hits[..., k] & valid[..., k]).sum())
            counts[name] += int(valid[..., k].sum())
        occupied = batch_labels[..., 0] == 1
        objects_right += int((hits[..., :4].all(-1) & occupied).sum())
        objects += int(occupied.sum())
    model.train()
    accuracy = {name: correct[name] / max(counts[name], 1) for name in DENSE_HEADS}
    accuracy["object"] = objects_right / max(objects, 1)
    return {name: round(value, 4) for name, value in accuracy.items()}


def pretrain_vision_tower(
    out_dir: PathLike, synthetic_spec: Any, tower_cfg: Any, pretrain_cfg: Any = None, force: bool = False,
    source: Optional[str] = None,
) -> Dict[str, Any]:
    """Train a random-init CLIP tower with dense per-patch heads on synthetic scenes; save it to `out_dir`.

    `synthetic_spec` is `demo.synthetic`, `tower_cfg` is `model.vision_tower` (sizes and `select_layer`; its
    `path` is ignored), `pretrain_cfg` is `demo.bases.vision`. Writes `config.json` + `model.safetensors` (a
    `CLIPVisionModel`), `preprocessor_config.json` (`CLIPImageProcessorPil`) and, last,
    `pretrain_metrics.json` (per-head held-out accuracy over time). Returns the metrics; returns the saved
    ones at once when `out_dir` already holds a finished run with the same configuration (unless `force`).
    With `source` (`demo.bases.source`, where `out_dir`'s tower was copied from) a tower that does not match raises
    `BaseMismatchError` instead of being retrained.
    """
    spec = as_spec(synthetic_spec)
    tower = as_dataclass(VisionTowerConfig, tower_cfg)
    cfg = as_dataclass(VisionPretrainConfig, pretrain_cfg)
    _check_geometry(spec, tower)
    digest = vision_fingerprint(spec, tower, cfg)
    done = finished_metrics(out_dir, digest, _SAVED_FILES)
    if done is not None and not force:
        logger.info("vision tower at %s matches the config (fingerprint %s); not retraining", out_dir, digest)
        return done
    if source is not None:
        raise refuse_mismatch("vision tower", out_dir, digest, source)
    state = run_state()
    if state.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        clear_metrics(out_dir)
    torch.manual_seed(cfg.seed)
    processor = clip_image_processor(tower.image_size)
    start = time.perf_counter()  # every process renders the same banks (same seeds)
    train_bank = render_bank(spec, processor, cfg.bank_size, cfg.seed, _TRAIN_STREAM)
    eval_bank = render_bank(spec, processor, cfg.eval_size, cfg.seed, _EVAL_STREAM)
    render_seconds = time.perf_counter() - start
    model = build_clip_vision(tower)
    heads = DenseHeads(tower.hidden_size, spec)
    history = _train(model, heads, train_bank, eval_bank, tower, cfg, out_dir)
    if not state.is_main_process:  # the first process writes the tower; the others read its metrics once it has
        state.wait_for_everyone()
        return finished_metrics(out_dir, digest, _SAVED_FILES)
    model.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    metrics = {
        "fingerprint": digest,
        "select_layer": tower.select_layer,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "render_seconds": round(render_seconds, 2),
        "train_seconds": history[-1]["seconds"],
        "steps": history[-1]["step"],
        "final": history[-1]["accuracy"],
        "history": history,
    }
    write_metrics(out_dir, metrics)
    logger.info("vision tower saved to %s after %d steps (%.0fs): %s", out_dir, metrics["steps"],
                metrics["train_seconds"], metrics["final"])
    state.wait_for_everyone()
    return metrics


class DenseModel(nn.Module):
    """The tower and its dense heads as one module for the Trainer: (pixels, labels) -> {"loss": dense_loss}."""

    def __init__(self, tower: CLIPVisionModel, heads: DenseHeads, select_layer: int):
        super().__init__()
        self.tower, self.heads, self.select_layer = tower, heads, select_layer
        self.last_loss: Optional[torch.Tensor] = None  # read only when a record is made: no sync every step

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        loss = dense_loss(self.heads(patch_features(self.tower, pixel_values, self.select_layer)), labels)
        self.last_loss = loss.detach()
        return {"loss": loss}


class BankDataset(Dataset):
    """A rendered bank (`render_bank`) as a dataset of `{"pixel_values", "labels"}` items."""

    def __init__(self, bank: Tuple[torch.Tensor, torch.Tensor]):
        self.pixels, self.labels = bank

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def _train(model, heads, train, evaluation, tower: VisionTowerConfig, cfg: VisionPretrainConfig,
           out_dir: PathLike) -> list:
    """Train tower and heads with HF's Trainer (data-parallel under torchrun: `cfg.batch_size` is the global
    batch); the main process scores the eval bank at step 0 (the random-init reference) and every
    `cfg.eval_every` steps."""
    try:
        args = pretrain_arguments(out_dir, max_steps=cfg.max_steps, batch_size=cfg.batch_size,
                                  learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  warmup_ratio=cfg.warmup_ratio, seed=cfg.seed)
    except ValueError as err:
        raise ValueError(f"demo.bases.vision.{err}") from None
    dense = DenseModel(model, heads, tower.select_layer)
    trainer = Trainer(model=dense, args=args, train_dataset=BankDataset(train))

    def record(step: int, seconds: float) -> Dict[str, Any]:
        row = {"step": step, "seconds": seconds, "loss": round(dense.last_loss.item(), 4),
               "accuracy": dense_accuracy(model, heads, *evaluation, tower.select_layer)}
        logger.info("vision step %d (%.0fs) %s", step, seconds, row)
        return row

    records = StepRecords(record, cfg.eval_every, cfg.max_steps, cfg.max_seconds)
    if args.process_index == 0:
        records.history.append({"step": 0, "seconds": 0.0,
                                "accuracy": dense_accuracy(model, heads, *evaluation, tower.select_layer)})
    trainer.add_callback(records)
    trainer.train()
    return records.history


# The `demo.synthetic` fields the tower's images and labels depend on (`labelled_scene`): the rest (split
# sizes, question mix, turns, ...) only shape the Q/A records, so changing them reuses a saved tower.
_SCENE_FIELDS = ("seed", "image_size", "grid", "min_objects", "max_objects", "colours", "shapes", "jitter")


def vision_fingerprint(spec: SyntheticConfig, tower: VisionTowerConfig, cfg: VisionPretrainConfig) -> str:
    """Identity of a pretrained tower: the scene fields of `spec`, the tower's sizes, the pretraining config."""
    scene = {name: getattr(spec, name) for name in _SCENE_FIELDS}
    return fingerprint({"kind": "vision", "scene": scene, "tower": _tower_fields(tower),
                        "pretrain": dataclasses.asdict(cfg)})


def _check_geometry(spec: SyntheticConfig, tower: VisionTowerConfig) -> None:
    if tower.image_size % tower.patch_size or tower.image_size // tower.patch_size != spec.grid:
        raise ValueError(
            f"model.vision_tower.image_size={tower.image_size} / patch_size={tower.patch_size} must give one patch "
            f"per grid cell (demo.synthetic.grid={spec.grid}) for dense pretraining"
        )


def _tower_fields(tower: VisionTowerConfig) -> Dict[str, Any]:
    fields = dataclasses.asdict(tower)
    for key in ("path", "freeze", "model_type"):  # the demo's tower is always a CLIP of the size fields
        fields.pop(key)
    return fields
