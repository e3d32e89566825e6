"""Measured memory of a training step on any device, CPU included: what `vir-plan`'s estimate is checked against.

`LiveBytes` is a torch dispatch mode that counts the bytes of every storage an operation creates while it is
active, until that storage is freed, and keeps the peak. That is what CUDA's `max_memory_allocated` reports for
the same step, without the caching allocator's rounding, so the estimate can be checked on a machine with no GPU:
the autograd graph (which tensors are saved for backward, when temporaries die) is the same on every device. The
kernels differ only inside fused operations (attention, 4-bit matmuls), whose own workspaces this cannot see.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created by operations run under this mode, alive now (`current`) and at most
    (`peak`), on top of `resident` bytes that existed before (weights, optimizer states). Meta tensors count only
    with `count_meta` (`vir.planning.memory` measures a layer at real shapes on the meta device)."""

    def __init__(self, resident: int = 0, count_meta: bool = False):
        super().__init__()
        self.count_meta = count_meta  # meta tensors too: what a step at real shapes would allocate
        self._sizes: Dict[int, int] = {}
        self.resident = resident
        self.current = self.peak = resident

    def _freed(self, key: int) -> None:
        self.current -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in _allocated(func, out, self.count_meta):
            storage = tensor.untyped_storage()
            key = id(storage)  # a storage keeps one Python object for its lifetime
            if key in self._sizes or not storage.nbytes():
                continue
            self._sizes[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.current)
        return out


def _allocated(func, out, meta: bool = False) -> Iterator[torch.Tensor]:
    """The tensors among an operation's results that it may have allocated: not views or in-place results,
    which its schema marks as aliasing an input (`Tensor(a)`, `Tensor(a!)`, `Tensor(a)[]`)."""
    returns = func._schema.returns
    values = out if len(returns) > 1 else (out,)
    for declared, value in zip(returns, values):
        if declared.alias_info is None:
            yield from (t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor) and (meta or not t.is_meta))


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under `tensors` (tied or viewed weights count once)."""
    seen: Dict[Any, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[(storage.data_ptr(), storage.device)] = storage.nbytes()
    return sum(seen.values())


def peak_step_bytes(step: Callable[[], None], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Peak bytes of one call of `step` (forward, backward, optimizer step, gradients set to None) after a first,
    unmeasured call has created the optimizer's states: weights, buffers and states are counted as resident."""
    step()
    states = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    resident = storage_bytes([*model.parameters(), *model.buffers(), *states])
    with LiveBytes(resident) as live:
        step()
    return live.peak
