"""Run one training stage from Hydra overrides (under torchrun or alone) and save what each rank holds.

    torchrun --nproc_per_node=2 tests/distributed_driver.py OUT_DIR OVERRIDES...

Writes OUT_DIR/rank<R>.pt: the rank's trained parameters (LoRA and projector) after training, in float32. The
run's own artifacts go to `training.output_dir` as usual (trainer_state.json holds the logged losses).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import vir.training.run as run_module
from vir.training.distributed import run_state
from vir.utils.config import compose_config


def main(out_dir: str, overrides: list) -> None:
    captured = []

    class Capturing(run_module.LlavaTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.append(self)

    run_module.LlavaTrainer = Capturing
    run_module.run_training(compose_config(overrides))
    model = captured[0].model
    state = {name: p.detach().float().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(out_dir) / f"rank{run_state().process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
