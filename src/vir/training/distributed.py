"""Multi-process runs (`torchrun --nproc_per_node N -m vir.cli.train ...`): the run's once-only work.

accelerate's `PartialState` owns the process group (gloo on CPU, nccl on GPU), the same one the HF Trainer
then trains with. Work whose output every process reads (the synthetic data set, the bases, the stage
artifacts) is written by one process while the others wait at a barrier; a single-process run is unchanged.

    with main_process_first():   # rank 0 writes (on every local core); the others then find it done
        paths = generate(run_dir / "data", spec)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from accelerate import PartialState


def run_state() -> PartialState:
    """The process-group state of this run (initialised from torchrun's environment on first use)."""
    return PartialState(cpu=not torch.cuda.is_available())


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    """`counts` summed over every process of the run (the same dict in a single-process run)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(counts)
    names = sorted(counts)
    # nccl reduces accelerator tensors only; gloo CPU ones.
    device = run_state().device if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor([counts[name] for name in names], dtype=torch.int64, device=device)
    dist.all_reduce(totals)
    return {name: int(total) for name, total in zip(names, totals.tolist())}


def sum_array_over_processes(values: np.ndarray) -> np.ndarray:
    """An int64 array summed element-wise over every process of the run (a copy in a single-process run)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values.copy()
    device = run_state().device if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(values, dtype=torch.int64, device=device)  # a copy: all_reduce works in place
    dist.all_reduce(total)
    return total.cpu().numpy()


def all_processes_agree(flag: bool) -> bool:
    """True only when `flag` is true on every process of the run (`flag` itself in a single-process run)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = run_state().device if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(value)  # the number of processes where it is false
    return int(value.item()) == 0


@contextmanager
def main_process_first() -> Iterator[None]:
    """accelerate's `main_process_first`, with the main process on the threads of every local process while
    the others wait at the barrier (it writes alone: the data set, the bases)."""
    state = run_state()
    with state.main_process_first():
        with borrowed_cores(state.is_main_process):
            yield


@contextmanager
def borrowed_cores(borrow: bool = True) -> Iterator[None]:
    """While other local processes wait or have finished, this one runs on their threads too (torchrun sets
    OMP_NUM_THREADS per process). No-op in a single-process run or with `borrow=False`."""
    threads = torch.get_num_threads()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if borrow and local_processes > 1:
        torch.set_num_threads(threads * local_processes)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
