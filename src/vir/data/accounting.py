"""What trained, per record: the ledger behind `data_stats.json`.

Every sample a `LazySupervisedDataset` returns carries `record_events`, a LongTensor `[m, 2]` of
`(record index, event code)` pairs: the record it holds was trained (`trained`), cut (`truncated`), each of its
images loaded or fell back (`images_<status>`, one row per image), and every record it replaced could not be
trained (`skipped`). The trainer feeds the rows of the batches that actually trained into a `RecordLedger`
(prefetched batches that never trained are never counted), and the summary counts records, not load events: a
record skipped on each of 3 epochs is one skipped record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from vir.utils.errors import UserError

EVENTS = ("trained", "truncated", "skipped", "images_ok", "images_missing", "images_corrupt", "images_refused",
          "images_too_large")
EVENT_CODE = {name: code for code, name in enumerate(EVENTS)}
_IMAGE_EVENTS = tuple(name for name in EVENTS if name.startswith("images_"))
LEDGER_FILE = "data_ledger.npy"
MAX_LISTED = 1000  # records named per list in data_stats.json (the counts are always complete)


def record_events(index: int, *names: str) -> list[tuple[int, int]]:
    """Rows `(index, code)` for `names` (see module doc)."""
    return [(index, EVENT_CODE[name]) for name in names]


class RecordLedger:
    """Per-record event counts of one process (`counts[event, record]`), summed over processes at the end."""

    def __init__(self, num_records: int):
        self.counts = np.zeros((len(EVENTS), num_records), dtype=np.int64)

    def add(self, rows: torch.Tensor) -> None:
        """Count a batch's `record_events` rows (`[M, 2]`)."""
        if rows.numel():
            rows = rows.detach().cpu().numpy()
            np.add.at(self.counts, (rows[:, 1], rows[:, 0]), 1)

    def reduced(self, reduce: Callable[[np.ndarray], np.ndarray]) -> "RecordLedger":
        """A ledger holding `reduce(counts)` (e.g. the sum over processes)."""
        total = RecordLedger(self.counts.shape[1])
        total.counts = reduce(self.counts)
        return total

    def save(self, path: Path) -> None:
        np.save(path, self.counts, allow_pickle=False)

    def load(self, path: Path) -> None:
        """Start from a checkpoint's ledger (the main process's holds the run's total so far)."""
        counts = np.load(path, allow_pickle=False)
        if counts.shape != self.counts.shape:
            raise UserError(f"{path}: a ledger of shape {counts.shape}, this data set needs {self.counts.shape} "
                             "(the checkpoint was trained on another data file)")
        self.counts = counts

    def totals(self) -> dict[str, int]:
        """The summary counts (see `summary`), without the record lists."""
        trained = self.counts[EVENT_CODE["trained"]]
        times = np.maximum(trained, 1)
        out = {"samples_trained": int(trained.sum()), "records_trained": int((trained > 0).sum()),
               "truncated": int((self.counts[EVENT_CODE["truncated"]] > 0).sum()),
               "skipped": int((self.counts[EVENT_CODE["skipped"]] > 0).sum())}
        for name in _IMAGE_EVENTS:  # an image's status is a property of its file: per record, once
            out[name] = int((self.counts[EVENT_CODE[name]] // times).sum())
        return out

    def summary(self, record_id: Callable[[int], str], skip_reason: Optional[Callable[[int], str]] = None) -> dict:
        """`totals()` plus the records behind them: `skipped_records` ({id, reason}), `truncated_records` and
        `fallback_image_records` ({id, missing/corrupt/refused/too_large counts}), each at most `MAX_LISTED`."""
        out: dict = self.totals()
        skipped = np.flatnonzero(self.counts[EVENT_CODE["skipped"]])[:MAX_LISTED]
        out["skipped_records"] = [{"id": record_id(int(i)), **({"reason": skip_reason(int(i))} if skip_reason else {})}
                                  for i in skipped]
        out["truncated_records"] = [record_id(int(i))
                                    for i in np.flatnonzero(self.counts[EVENT_CODE["truncated"]])[:MAX_LISTED]]
        fallback_codes = [EVENT_CODE[name] for name in _IMAGE_EVENTS if name != "images_ok"]
        times = np.maximum(self.counts[EVENT_CODE["trained"]], 1)
        listed = []
        for i in np.flatnonzero(self.counts[fallback_codes].sum(axis=0))[:MAX_LISTED]:
            row = {"id": record_id(int(i))}
            row.update({EVENTS[c].removeprefix("images_"): int(self.counts[c, i] // times[i])
                        for c in fallback_codes if self.counts[c, i]})
            listed.append(row)
        out["fallback_image_records"] = listed
        return out
