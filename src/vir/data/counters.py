"""Event counters that survive DataLoader worker processes."""

from __future__ import annotations

import torch
from torch.utils.data import get_worker_info


class SharedCounters:
    """int64 event counters in shared memory, one row per DataLoader worker (row 0: the main process).

    Each process writes only its own row, so there are no lost updates; `total` sums the rows and sees the
    workers' counts live from the main process.
    """

    def __init__(self, names: tuple[str, ...], num_rows: int):
        self.names = names
        self._column = {name: k for k, name in enumerate(names)}
        self.table = torch.zeros(num_rows, len(names), dtype=torch.int64).share_memory_()

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else 1 + info.id % (self.table.shape[0] - 1)

    def add(self, name: str, count: int = 1) -> None:
        self.table[self._row(), self._column[name]] += count

    def total(self, name: str) -> int:
        return int(self.table[:, self._column[name]].sum())

    def reset(self) -> None:
        self.table.zero_()
