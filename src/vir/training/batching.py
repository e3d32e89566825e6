"""The global batch, set once: per-device micro-batch and gradient accumulation follow from the world size."""

from __future__ import annotations

from typing import Any, Tuple

from vir.utils.config import ConfigError


def batch_layout(training_cfg: Any, world_size: int) -> Tuple[int, int]:
    """(per-device micro-batch, gradient-accumulation steps) for `training.*` on `world_size` processes.

    With `training.global_batch_size` null, `per_device_train_batch_size` and `gradient_accumulation_steps` are
    used as given. Otherwise each process takes `global_batch_size / world_size` samples per optimizer step, in
    the largest micro-batch that divides it and is at most `per_device_train_batch_size` (what fits in memory),
    the rest by accumulation: the same optimisation on 1 or 64 GPUs.
    """
    micro = training_cfg.per_device_train_batch_size
    total = training_cfg.global_batch_size
    if micro < 1:
        raise ConfigError(f"training.per_device_train_batch_size={micro} must be >= 1")
    if total is None:
        return micro, training_cfg.gradient_accumulation_steps
    if total < 1:
        raise ConfigError(f"training.global_batch_size={total} must be >= 1 (or null)")
    if total % world_size:
        raise ConfigError(f"training.global_batch_size={total} does not split over {world_size} processes: "
                          f"choose a multiple of {world_size}, or run on a number of processes that divides it")
    per_process = total // world_size
    micro = max(size for size in range(1, min(micro, per_process) + 1) if per_process % size == 0)
    return micro, per_process // micro
