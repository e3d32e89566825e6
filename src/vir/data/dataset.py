"""`LazySupervisedDataset`: LLaVA-format records -> `{input_ids, labels, pixel_values}`, images opened lazily.

Records are parsed and validated once, at construction, into a compact form that DataLoader workers share
copy-on-write (`records.RecordStore`: one byte buffer + offsets), plus numpy arrays of estimated lengths and
image counts.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from vir.data.accounting import record_events
from vir.data.conversation import (
    DEFAULT_IMAGE_TOKEN,
    MISSING_ID_PREFIX,
    InvalidRecordError,
    Record,
    normalize_record,
)
from vir.data.counters import SharedCounters
from vir.data.images import (
    IMAGE_ASPECT_RATIOS,
    IMAGE_OK,
    black_image,
    load_image,
    preprocess_images,
    processor_image_size,
)
from vir.data.records import DataFileError, RecordStore, read_raw_records
from vir.data.templates import (
    TruncationResult,
    build_example,
    check_template,
    truncate_example,
)
from vir.utils.errors import UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "eval", "test")
COUNTERS = ("images_ok", "images_missing", "images_corrupt", "images_refused", "images_too_large", "truncated",
            "skipped")
_WARNING_BUDGETS = ("_image_warnings", "_skip_warnings")
CHARS_PER_TOKEN = 4  # rule of thumb for English BPE; `lengths` only has to rank samples for grouping
TOKENS_PER_TURN = 5  # header, role, "\n\n", eot


@dataclass
class SampleReport:
    """What `LazySupervisedDataset.inspect` found for one record (no counters touched, nothing logged).

    `issues` holds `truncated`, `skipped:<reason>`, `image_missing:<path>`, `image_corrupt:<path>`,
    `image_refused:<path>`. When `skipped`, `input_ids`/`labels` are the uncut sequences.
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    num_images: int
    issues: list[str] = field(default_factory=list)
    skipped: bool = False


class LazySupervisedDataset(Dataset):
    """Supervised multimodal samples; item `i` is
    `{"input_ids": LongTensor[T], "labels": LongTensor[T], "pixel_values": FloatTensor[N, 3, H, W],
    "record_events": LongTensor[m, 2]}`, N the record's image count (0 for text-only: shape [0, 3, H, W]) and
    `record_events` what the sample means for the per-record ledger (`vir.data.accounting`).

    Invalid records are excluded at construction and listed in `invalid_records` as `(id, reason)`. A record
    too long to keep its images, or with nothing left to train after truncation, is replaced by the next one
    that can train (deterministically, warning with its id). Broken, missing or refused images become black
    images. `stats()` counts these events across DataLoader workers.
    """

    def __init__(
        self,
        data_path: Union[str, Path],
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        *,
        num_image_tokens: int,
        image_folder: Optional[Union[str, Path]] = None,
        template: str = "llama3",
        image_token: str = DEFAULT_IMAGE_TOKEN,
        model_max_length: int = 2048,
        image_aspect_ratio: str = "pad",
        system_prompt: Optional[str] = None,
        max_image_warnings: int = 20,
        num_workers: int = 0,
    ):
        """`image_folder` defaults to the data file's directory; image paths may not leave it.
        `num_workers` only sizes the counter table (at least 64 worker rows are kept)."""
        self.data_path = Path(data_path)
        if not self.data_path.is_file():
            raise FileNotFoundError(f"data file not found: {self.data_path}")
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise UserError(f"unknown image_aspect_ratio {image_aspect_ratio!r} (data.image_aspect_ratio); "
                             f"choices: {list(IMAGE_ASPECT_RATIOS)}")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.image_folder = Path(image_folder) if image_folder is not None else self.data_path.parent
        if not self.image_folder.is_dir():
            raise NotADirectoryError(f"image folder not found (data.image_folder): {self.image_folder}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = check_template(template, tokenizer)  # one-line TemplateError before any record is read
        self.image_token = image_token
        self.image_token_id = _image_token_id(tokenizer, image_token)
        self.num_image_tokens = num_image_tokens
        self.model_max_length = model_max_length
        self.image_aspect_ratio = image_aspect_ratio
        self.system_prompt = system_prompt
        self.max_image_warnings = max_image_warnings
        self._pixel_shape: Optional[tuple[int, ...]] = None
        self._counters = SharedCounters(COUNTERS + _WARNING_BUDGETS, max(num_workers, 64) + 1)
        self._index_records()

    @classmethod
    def from_config(
        cls,
        data_cfg: Any,
        split: str,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        num_image_tokens: int,
        model_max_length: int,
        image_token: str = DEFAULT_IMAGE_TOKEN,
    ) -> "LazySupervisedDataset":
        """The `split` ("train" | "eval" | "test") dataset described by a `DataConfig` (`data.*` keys)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choices: {list(SPLITS)}")
        key = f"{split}_path"
        path = getattr(data_cfg, key)
        if not path:
            raise UserError(f"data.{key} is not set: pass data.{key}=/path/to/records.json")
        if Path(path).is_dir():
            raise DataFileError(f"data.{key}={path} is a directory: name the JSON or JSONL file of records in it")
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.{key}: no such file: {path}")
        return cls(
            path, tokenizer, image_processor,
            num_image_tokens=num_image_tokens,
            image_folder=data_cfg.image_folder,
            template=data_cfg.template,
            image_token=image_token,
            model_max_length=model_max_length,
            image_aspect_ratio=data_cfg.image_aspect_ratio,
            system_prompt=data_cfg.system_prompt,
            max_image_warnings=data_cfg.max_image_warnings,
            num_workers=data_cfg.num_workers,
        )

    # ---- index ---------------------------------------------------------------------------------------
    def _index_records(self) -> None:
        # Records are encoded as they stream by: no list of Record objects is ever held.
        chunks: list[bytes] = []
        lengths: list[int] = []
        num_images: list[int] = []
        self.invalid_records: list[tuple[str, str]] = []
        self.num_records_total = 0
        self.records_without_id = 0
        self.unanswered_records: list[str] = []  # ids of records whose last turn is an unanswered user turn
        seen: set = set()  # dropped after indexing: workers never hold it
        duplicates: dict = {}
        for index, raw in enumerate(read_raw_records(self.data_path)):
            self.num_records_total += 1
            try:
                record = normalize_record(raw, index, self.image_token)
            except InvalidRecordError as err:
                self.invalid_records.append((err.record_id, err.reason))
                continue
            if record.messages[-1].role == "user":
                self.unanswered_records.append(record.id)
            if record.id.startswith(MISSING_ID_PREFIX):
                self.records_without_id += 1
            elif record.id in seen:
                duplicates[record.id] = duplicates.get(record.id, 1) + 1
            seen.add(record.id)
            chunks.append(RecordStore.encode(record))
            lengths.append(self._estimate_length(record))
            num_images.append(record.num_images)
        self.duplicate_ids = dict(sorted(duplicates.items()))  # {id: how many records share it}
        if self.unanswered_records:
            logger.warning("%s: %d records end on a user turn with no answer; that turn trains nothing (e.g. %s)",
                           self.data_path, len(self.unanswered_records), ", ".join(self.unanswered_records[:5]))
        if self.duplicate_ids or self.records_without_id:
            logger.warning("%s: %d records have no id (named #<position>), %d ids are shared by several records%s",
                           self.data_path, self.records_without_id, len(self.duplicate_ids),
                           f" (e.g. {', '.join(list(self.duplicate_ids)[:5])})" if self.duplicate_ids else "")
        self._store = RecordStore(chunks)
        self._num_images = np.array(num_images, dtype=np.int32)
        self._lengths = np.array(lengths, dtype=np.int64)
        if self.invalid_records:
            shown = "; ".join(f"{rid}: {reason}" for rid, reason in self.invalid_records[:5])
            more = f"; and {len(self.invalid_records) - 5} more" if len(self.invalid_records) > 5 else ""
            logger.warning("%s: %d of %d records are invalid and excluded (%s%s). All are in "
                           "dataset.invalid_records; `vir-validate` reports them.", self.data_path,
                           len(self.invalid_records), self.num_records_total, shown, more)
        if not chunks:
            logger.error("%s: no valid record out of %d", self.data_path, self.num_records_total)

    def _estimate_length(self, record: Record) -> int:
        chars = sum(len(m.content) for m in record.messages) - len(self.image_token) * record.num_images
        return (1 + TOKENS_PER_TURN * len(record.messages) + -(-chars // CHARS_PER_TOKEN)
                + record.num_images * self.num_image_tokens)

    def __len__(self) -> int:
        return len(self._store)

    def record(self, i: int) -> Record:
        """The normalised record behind index `i` (tags placed, before any system prompt)."""
        return self._store[i]

    def record_id(self, i: int) -> str:
        return self._store[i].id

    def iter_raw_records(self) -> Iterator[Any]:
        """The file's raw records, valid or not, in file order (re-read from disk)."""
        return read_raw_records(self.data_path)

    @property
    def lengths(self) -> list[int]:
        """Estimated token length per sample, image tokens included (a new list per call)."""
        return self._lengths.tolist()

    @property
    def modality_lengths(self) -> list[int]:
        """LLaVA's convention: `+length` for samples with images, `-length` for text-only."""
        return np.where(self._num_images > 0, self._lengths, -self._lengths).tolist()

    # ---- samples -------------------------------------------------------------------------------------
    def _tokenize(self, record: Record) -> tuple[list[int], list[int], TruncationResult]:
        input_ids, labels = build_example(record, self.tokenizer, self.template, self.image_token_id,
                                          self.num_image_tokens, self.system_prompt, self.image_token)
        result = truncate_example(input_ids, labels, self.model_max_length, self.image_token_id,
                                  self.num_image_tokens)
        return input_ids, labels, result

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        skipped: list[tuple[int, int]] = []
        for step in range(n):
            index = (i + step) % n
            sample = self._build_sample(index)
            if sample is not None:
                sample["record_events"] = torch.tensor(skipped + sample["record_events"], dtype=torch.long)
                return sample
            skipped += record_events(index, "skipped")
        raise RuntimeError(f"{self.data_path}: no record can be trained at model_max_length="
                           f"{self.model_max_length} (all skipped; see dataset.stats())")

    def skip_reason(self, i: int) -> Optional[str]:
        """Why sample `i` cannot be trained at `model_max_length` (tokenized only, no image opened), else None."""
        return self._tokenize(self.record(i))[2].skip_reason

    def check_trainable(self, key: str, scan: int = 1000) -> None:
        """Raise `DataFileError` (naming `key`, the data file's config key) when nothing here can train: no valid
        record, or none of the first `scan` records fits `model_max_length`. Called before any model loads."""
        if len(self) == 0:
            reasons = "; ".join(f"{rid}: {why}" for rid, why in self.invalid_records[:3])
            raise DataFileError(
                f"{key}={self.data_path}: nothing to train on ({self.num_records_total} records, "
                f"{len(self.invalid_records)} invalid{': ' + reasons if reasons else ''}); `vir-validate` lists them")
        skipped = []
        for i in range(min(len(self), scan)):
            reason = self.skip_reason(i)
            if reason is None:
                return
            skipped.append((self.record_id(i), reason))
        shown = "; ".join(f"{rid}: {why}" for rid, why in skipped[:3])
        raise DataFileError(f"{key}={self.data_path}: none of the first {len(skipped)} records can be trained at "
                            f"model.model_max_length={self.model_max_length} ({shown}); raise the limit or check "
                            "the records with `vir-validate`")

    def _build_sample(self, i: int) -> Optional[dict[str, torch.Tensor]]:
        record = self.record(i)
        _, _, result = self._tokenize(record)
        if result.skip_reason is not None:
            self._counters.add("skipped")
            self._warn_limited("_skip_warnings", "record %r skipped (%s at model_max_length=%d); using the "
                               "next record instead", record.id, result.skip_reason, self.model_max_length)
            return None
        events = record_events(i, "trained", *(["truncated"] if result.truncated else []))
        if result.truncated:
            self._counters.add("truncated")
        pixel_values, statuses = self._pixel_values(record)
        return {
            "input_ids": torch.tensor(result.input_ids, dtype=torch.long),
            "labels": torch.tensor(result.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "record_events": events + record_events(i, *(f"images_{status}" for status in statuses)),
        }

    def _pixel_values(self, record: Record) -> tuple[torch.Tensor, list[str]]:
        """The record's processed images and each one's load status."""
        images, statuses = [], []
        for path in record.images:
            image, status = load_image(path, self.image_folder, min(self.image_size))
            statuses.append(status)
            self._counters.add(f"images_{status}")
            if image is None:
                self._warn_limited("_image_warnings", "record %r: image %s is %s (under %s); using a black image",
                                   record.id, path, status, self.image_folder)
                image = black_image(self.image_size)
            images.append(image)
        if not images:
            return torch.zeros((0, *self.pixel_shape)), statuses
        return self._process(images), statuses

    def _process(self, images: list) -> torch.Tensor:
        return preprocess_images(images, self.image_processor, self.image_aspect_ratio)

    @functools.cached_property
    def image_size(self) -> tuple[int, int]:
        """`(width, height)` the image processor produces (large images decode reduced to about twice it)."""
        return processor_image_size(self.image_processor)

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """`(3, H, W)` of one processed image."""
        if self._pixel_shape is None:
            self._pixel_shape = tuple(self._process([black_image(self.image_size)]).shape[1:])
        return self._pixel_shape

    def _warn_limited(self, budget: str, message: str, *args: Any) -> None:
        # Cross-worker totals are read without a lock: near the limit a few extra warnings may slip through.
        seen = self._counters.total(budget)
        if seen < self.max_image_warnings:
            logger.warning(message, *args)
        elif seen == self.max_image_warnings:
            logger.warning("%s: further %s warnings suppressed (data.max_image_warnings=%d); see dataset.stats()",
                           self.data_path, budget.strip("_").replace("_warnings", ""), self.max_image_warnings)
        else:
            return
        self._counters.add(budget)

    # ---- reporting -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Event counts summed over all processes: keys `COUNTERS`."""
        return {name: self._counters.total(name) for name in COUNTERS}

    def reset_stats(self) -> None:
        self._counters.reset()

    def inspect(self, i: int) -> SampleReport:
        """Check sample `i` without substituting anything: tokenization, truncation and every image."""
        record = self.record(i)
        input_ids, labels, result = self._tokenize(record)
        issues = ["truncated"] if result.truncated else []
        if result.skip_reason is not None:
            issues.append(f"skipped:{result.skip_reason}")
        for path in record.images:
            status = load_image(path, self.image_folder)[1]
            if status != IMAGE_OK:
                issues.append(f"image_{status}:{path}")
        skipped = result.skip_reason is not None
        return SampleReport(record.id, input_ids if skipped else result.input_ids,
                            labels if skipped else result.labels, record.num_images, issues, skipped)


def _image_token_id(tokenizer: PreTrainedTokenizerBase, image_token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {image_token!r} token: prepare it with "
                         f"vir.models.builder.prepare_tokenizer (model.image_token)")
    return token_id
