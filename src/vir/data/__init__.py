"""Data room: records -> conversations -> (input_ids, labels); lazy images; batch collation."""

from vir.data.collator import DataCollatorForSupervisedDataset, pad_batch
from vir.data.conversation import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    InvalidRecordError,
    Message,
    Record,
    normalize_record,
)
from vir.data.dataset import COUNTERS, LazySupervisedDataset, SampleReport
from vir.data.images import black_image, expand_to_square, load_image, preprocess_images, to_rgb
from vir.data.records import DataFileError, read_raw_records
from vir.data.templates import (
    TEMPLATES,
    TruncationResult,
    build_example,
    build_generation_prompt,
    check_template,
    generation_stop_ids,
    get_template,
    truncate_example,
)
from vir.data.templates_text import TemplateError

__all__ = [
    "COUNTERS",
    "DEFAULT_IMAGE_TOKEN",
    "IGNORE_INDEX",
    "TEMPLATES",
    "TemplateError",
    "DataCollatorForSupervisedDataset",
    "DataFileError",
    "InvalidRecordError",
    "LazySupervisedDataset",
    "Message",
    "Record",
    "SampleReport",
    "TruncationResult",
    "black_image",
    "build_example",
    "build_generation_prompt",
    "check_template",
    "expand_to_square",
    "generation_stop_ids",
    "get_template",
    "load_image",
    "normalize_record",
    "pad_batch",
    "preprocess_images",
    "read_raw_records",
    "to_rgb",
    "truncate_example",
]
