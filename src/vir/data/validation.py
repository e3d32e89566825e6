"""Run every record through the dataset and summarise exactly what will train (`vir-validate`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

from vir.data.conversation import IGNORE_INDEX
from vir.data.dataset import LazySupervisedDataset

logger = logging.getLogger(__name__)


@dataclass
class ValidationSummary:
    """Counts over every record of one split, as printed by `vir-validate`."""

    records: int = 0
    valid: int = 0
    invalid: List[Tuple[str, str]] = field(default_factory=list)
    records_without_id: int = 0
    duplicate_ids: Dict[str, int] = field(default_factory=dict)  # {id: records sharing it}
    images_ok: int = 0
    images_missing: int = 0
    images_corrupt: int = 0
    images_refused: int = 0
    images_too_large: int = 0
    bad_images: List[Tuple[str, str, str]] = field(default_factory=list)  # (record id, status, path): black
    unanswered: List[str] = field(default_factory=list)  # ids of records ending on a user turn (not trained)
    text_only: int = 0
    single_image: int = 0
    multi_image: int = 0
    truncated: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    token_lengths: List[int] = field(default_factory=list)
    trained_tokens: int = 0
    total_tokens: int = 0

    @property
    def can_train(self) -> bool:
        """Data can train when no record is invalid and at least one sample survives."""
        return not self.invalid and self.valid - len(self.skipped) > 0

    def length_percentiles(self) -> Dict[str, int]:
        if not self.token_lengths:
            return {}
        arr = np.asarray(self.token_lengths)
        return {f"p{q}": int(np.percentile(arr, q)) for q in (0, 50, 90, 99, 100)}

    def to_dict(self) -> dict:
        return {
            "records": self.records,
            "valid": self.valid,
            "invalid": [{"id": i, "reason": r} for i, r in self.invalid],
            "records_without_id": self.records_without_id,
            "duplicate_ids": self.duplicate_ids,
            "images": {
                "ok": self.images_ok,
                "missing": self.images_missing,
                "corrupt": self.images_corrupt,
                "refused": self.images_refused,
                "too_large": self.images_too_large,
            },
            "bad_images": [{"id": i, "status": s, "path": p} for i, s, p in self.bad_images],
            "unanswered_final_turn": list(self.unanswered),
            "text_only": self.text_only,
            "single_image": self.single_image,
            "multi_image": self.multi_image,
            "truncated": self.truncated,
            "skipped": [{"id": i, "reason": r} for i, r in self.skipped],
            "token_length_percentiles": self.length_percentiles(),
            "trained_token_fraction": self.trained_fraction,
            "can_train": self.can_train,
        }

    @property
    def trained_fraction(self) -> float:
        return self.trained_tokens / self.total_tokens if self.total_tokens else 0.0


def validate_dataset(
    dataset: LazySupervisedDataset,
    dump_dir: Optional[str | Path] = None,
    max_records: Optional[int] = None,
    tokenizer=None,
) -> ValidationSummary:
    """Build every sample of `dataset` (images included) and count what happened to it.

    With `dump_dir`, writes `samples.jsonl` (one row per record: id, input_ids, labels, num_images, issues;
    invalid records included with empty ids and their reason) and `tokenizer/` so the masking can be
    re-checked independently.
    """
    summary = ValidationSummary(invalid=list(dataset.invalid_records),
                                records_without_id=dataset.records_without_id,
                                duplicate_ids=dict(dataset.duplicate_ids),
                                unanswered=list(dataset.unanswered_records))
    n = len(dataset) if max_records is None else min(len(dataset), max_records)
    summary.valid = n
    summary.records = n + len(summary.invalid)
    dump = _open_dump(dump_dir, tokenizer or dataset.tokenizer)
    try:
        for i in tqdm(range(n), desc="validating", unit="rec", disable=n < 200):
            report = dataset.inspect(i)
            _count(summary, report)
            if dump is not None:
                dump.write(json.dumps(_row(report)) + "\n")
        if dump is not None:
            for record_id, reason in summary.invalid:
                row = {"id": record_id, "input_ids": [], "labels": [], "num_images": 0}
                dump.write(json.dumps({**row, "issues": [f"invalid:{reason}"]}) + "\n")
    finally:
        if dump is not None:
            dump.close()
    return summary


# SampleReport issue kind -> the ValidationSummary counter it increments
_ISSUE_COUNTERS = {"image_missing": "images_missing", "image_corrupt": "images_corrupt",
                   "image_refused": "images_refused", "image_too_large": "images_too_large", "truncated": "truncated"}
_IMAGE_ISSUES = {"image_missing", "image_corrupt", "image_refused", "image_too_large"}
MAX_PRINTED = 20  # records named per list in the printed summary (the dump and the JSON hold all)


def _count(summary: ValidationSummary, report) -> None:
    bad_images = 0
    for issue in report.issues:
        kind, _, detail = issue.partition(":")
        if kind in _ISSUE_COUNTERS:
            setattr(summary, _ISSUE_COUNTERS[kind], getattr(summary, _ISSUE_COUNTERS[kind]) + 1)
        if kind in _IMAGE_ISSUES:
            bad_images += 1
            summary.bad_images.append((report.id, kind.removeprefix("image_"), detail))
    summary.images_ok += report.num_images - bad_images
    if report.num_images == 0:
        summary.text_only += 1
    elif report.num_images == 1:
        summary.single_image += 1
    else:
        summary.multi_image += 1
    if report.skipped:
        reason = next((i.split(":", 1)[1] for i in report.issues if i.startswith("skipped:")), "skipped")
        summary.skipped.append((report.id, reason))
        return
    summary.token_lengths.append(len(report.input_ids))
    summary.total_tokens += len(report.labels)
    summary.trained_tokens += sum(1 for label in report.labels if label != IGNORE_INDEX)


def _open_dump(dump_dir, tokenizer):
    if dump_dir is None:
        return None
    out = Path(dump_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    return open(out / "samples.jsonl", "w", encoding="utf-8")


def _row(report) -> dict:
    return {
        "id": report.id,
        "input_ids": list(map(int, report.input_ids)),
        "labels": list(map(int, report.labels)),
        "num_images": report.num_images,
        "issues": list(report.issues),
    }


def format_summary(summary: ValidationSummary, split: str, path: str) -> str:
    """Human-readable report printed by `vir-validate`."""
    pct = summary.length_percentiles()
    lines = [
        f"split: {split}  ({path})",
        f"records: {summary.records}  valid: {summary.valid}  invalid: {len(summary.invalid)}",
        f"images: ok {summary.images_ok}  missing {summary.images_missing}  corrupt {summary.images_corrupt}"
        f"  refused {summary.images_refused}  too large {summary.images_too_large}",
        f"samples: text-only {summary.text_only}  single-image {summary.single_image}"
        f"  multi-image {summary.multi_image}",
        f"truncated: {summary.truncated}  skipped: {len(summary.skipped)}",
        "token lengths: " + ("  ".join(f"{k} {v}" for k, v in pct.items()) if pct else "n/a"),
        f"trained-token fraction: {summary.trained_fraction:.3f}",
    ]
    for record_id, reason in summary.skipped[:MAX_PRINTED]:
        lines.append(f"  skipped {record_id}: {reason}")
    if summary.bad_images:
        lines.append(f"images that will train as black ({len(summary.bad_images)}; all in --dump / the JSON):")
        lines.extend(f"  {record_id}: {status} {path}" for record_id, status, path in summary.bad_images[:MAX_PRINTED])
        if len(summary.bad_images) > MAX_PRINTED:
            lines.append(f"  ... and {len(summary.bad_images) - MAX_PRINTED} more")
    if summary.unanswered:
        shown = ", ".join(summary.unanswered[:MAX_PRINTED])
        lines.append(f"records ending on an unanswered user turn (that turn is not trained): "
                     f"{len(summary.unanswered)} ({shown}{', ...' if len(summary.unanswered) > MAX_PRINTED else ''})")
    if summary.records_without_id:
        lines.append(f"records without an id: {summary.records_without_id} (named #<position in the file>)")
    if summary.duplicate_ids:
        shown = ", ".join(f"{rid} x{n}" for rid, n in list(summary.duplicate_ids.items())[:20])
        lines.append(f"duplicate ids: {len(summary.duplicate_ids)} ({shown})")
    if summary.invalid:
        lines.append("invalid records (will not train):")
        lines.extend(f"  {record_id}: {reason}" for record_id, reason in summary.invalid)
    warnings = bool(summary.bad_images or summary.skipped or summary.unanswered or summary.duplicate_ids)
    lines.append("status: " + ("FAILED" if not summary.can_train else
                               "OK, data can train (with the warnings above)" if warnings else "OK, data can train"))
    return "\n".join(lines)
