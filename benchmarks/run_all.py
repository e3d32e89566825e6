"""`make bench`: where a training step's time goes, at the embedded default's sizes (or any overrides).

Builds, in a temporary directory, a small synthetic data set and random-init bases with the sizes of
`experiment=local_debug` (LLM, CLIP tower), then times on this machine, per step of
`training.per_device_train_batch_size` samples: loading + collating a batch, the frozen tower's forward, and
one optimizer step in `stage1`, `stage2_lora` and `stage2_full`; and the padded batch length with LLaVA's
grouping (`training.length_grouping=1`) against length grouping. Prints a table; `--json PATH` also writes it.

    .venv/bin/python benchmarks/run_all.py                      # the embedded default's sizes
    .venv/bin/python benchmarks/run_all.py model.llm.hidden_size=256 training.per_device_train_batch_size=16
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from vir.data.collator import DataCollatorForSupervisedDataset
from vir.data.dataset import LazySupervisedDataset
from vir.demo.llm_base import build_llama
from vir.demo.synthetic import generate
from vir.demo.vision_base import build_clip_vision
from vir.models.builder import build_all, clip_image_processor
from vir.training.modes import apply_training_mode
from vir.training.sampler import modality_grouped_indices
from vir.utils.config import compose_config

WARMUP_STEPS, TIMED_STEPS = 2, 6


def build_inputs(root: Path, overrides: list[str]):
    """Synthetic data + random bases under `root`; returns (cfg, model, tokenizer, image_processor)."""
    base = compose_config(["experiment=local_debug", *overrides])
    spec = OmegaConf.to_container(base.demo.synthetic, resolve=True)
    spec.update(num_stage1=64, num_train=512, num_eval=8, num_test=8)
    data = generate(root / "data", spec)
    tokenizer = AutoTokenizer.from_pretrained(str(data.tokenizer))
    build_llama(base.model.llm, tokenizer).save_pretrained(str(root / "llm"))
    tokenizer.save_pretrained(str(root / "llm"))
    build_clip_vision(base.model.vision_tower).save_pretrained(str(root / "clip"))
    clip_image_processor(base.model.vision_tower.image_size).save_pretrained(str(root / "clip"))
    cfg = compose_config([
        "experiment=local_debug", *overrides, f"model.llm.path={root / 'llm'}", f"model.vision_tower.path={root / 'clip'}",
        f"model.tokenizer_path={data.tokenizer}", f"data.train_path={data.train}", f"data.image_folder={data.root}",
    ])
    model, tokenizer, processor = build_all(cfg)
    return cfg, model, tokenizer, processor


def time_steps(model, batches, mode: str, training_cfg) -> float:
    """Mean seconds per optimizer step (forward, backward, AdamW) in `mode`, after warm-up steps."""
    training = copy.deepcopy(training_cfg)
    training.mode = mode
    model = apply_training_mode(copy.deepcopy(model), training, vision_tower_freeze=True)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for k, batch in enumerate(batches[: WARMUP_STEPS + TIMED_STEPS]):
        if k == WARMUP_STEPS:
            start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / TIMED_STEPS


def padded_length(lengths: list[int], batch_size: int, grouping: int) -> float:
    """Mean padded batch length over one epoch of the modality-grouped sampler with `length_grouping`."""
    generator = torch.Generator().manual_seed(0)
    order = modality_grouped_indices(lengths, batch_size * grouping, generator, batch_size if grouping > 1 else None)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return float(np.mean([max(abs(lengths[i]) for i in b) for b in batches]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for vir-train")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, model, tokenizer, processor = build_inputs(Path(tmp), list(args.overrides))
        dataset = LazySupervisedDataset.from_config(cfg.data, "train", tokenizer, processor,
                                                    num_image_tokens=model.config.num_image_tokens,
                                                    model_max_length=cfg.model.model_max_length)
        collate = DataCollatorForSupervisedDataset(tokenizer.pad_token_id)
        bs = cfg.training.per_device_train_batch_size
        n_batches = WARMUP_STEPS + TIMED_STEPS
        start = time.perf_counter()
        batches = [collate([dataset[i] for i in range(k * bs, (k + 1) * bs)]) for k in range(n_batches)]
        results = {"batch_size": bs, "data_ms": 1000 * (time.perf_counter() - start) / n_batches}
        tower = model.get_vision_tower()
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                tower(batch["pixel_values"])
        results["tower_forward_ms"] = 1000 * (time.perf_counter() - start) / n_batches
        for mode in ("stage1", "stage2_lora", "stage2_full"):
            results[f"{mode}_step_ms"] = 1000 * time_steps(model, batches, mode, cfg.training)
        lengths = dataset.modality_lengths
        results["mean_length"] = float(np.mean(np.abs(lengths)))
        for grouping in (1, 32):
            results[f"padded_length_grouping_{grouping}"] = padded_length(lengths, bs, grouping)
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:8.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
