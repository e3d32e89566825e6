"""Reading LLaVA-format record files (JSON list or JSONL) and storing parsed records compactly.

`RecordStore` keeps every record as JSON bytes in one numpy `uint8` buffer with an `int64` offsets array, so
DataLoader workers share it copy-on-write: a list of 665k Python dicts would not do, since touching an
object's refcount writes to its page and every worker would end up with its own copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from vir.data.conversation import Message, Record
from vir.utils.errors import UserError


class DataFileError(UserError):
    """A data file that cannot be parsed; the message names the file (and line for JSONL)."""


def read_raw_records(path: Union[str, Path]) -> Iterator[Any]:
    """Yield the raw records of a JSON list or JSONL file (streamed line by line), raising `DataFileError`
    naming the file, the line and where it breaks."""
    hint = "expected a JSON list of records or one JSON object per line (JSONL)"
    try:
        with open(path, encoding="utf-8-sig") as handle:
            is_json_list = _first_non_space(handle) == "["
            handle.seek(0)
            if is_json_list:
                text = handle.read()
                try:
                    records = json.loads(text)
                except json.JSONDecodeError as err:
                    if comma := _trailing_comma(text, err, "line {line}, column {column}"):
                        raise DataFileError(f"{path}: malformed JSON, {comma}") from None
                    cut = " (the file ends before the list does: cut off?)" if _cut_off(text, err) else ""
                    raise DataFileError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: "
                                        f"{err.msg}{cut} ({hint})") from None
                del text
                yield from records
                return
            for lineno, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        if lineno == 1:
                            _refuse_multiline_object(path, handle)
                        if comma := _trailing_comma(line, err, "column {column}"):
                            raise DataFileError(f"{path}:{lineno}: malformed JSON line, {comma}") from None
                        where = (f"the line ends at column {len(line.rstrip())} before its record does (cut off?): "
                                 f"{err.msg}" if _cut_off(line, err) else f"column {err.colno}: {err.msg}")
                        raise DataFileError(f"{path}:{lineno}: malformed JSON line, {where} ({hint})") from None
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text ({err})") from None


def _cut_off(text: str, err: json.JSONDecodeError) -> bool:
    """Whether `text` stops being JSON only at its end, as a file or line cut short does (not "Extra data": that
    follows a complete value)."""
    return err.msg != "Extra data" and err.pos >= len(text.rstrip()) - 1


def _trailing_comma(text: str, err: json.JSONDecodeError, where: str) -> Optional[str]:
    """`a trailing comma at <where> before ']' ...` when `err` stopped at a `]` or `}` right after a comma (JSON,
    unlike Python and JavaScript, allows none), else None; `where` is formatted with the comma's `line` and
    `column`."""
    if err.pos >= len(text) or text[err.pos] not in "]}":
        return None
    comma = err.pos - 1
    while comma >= 0 and text[comma] in " \t\r\n":
        comma -= 1
    if comma < 0 or text[comma] != ",":
        return None
    at = where.format(line=text.count("\n", 0, comma) + 1, column=comma - text.rfind("\n", 0, comma))
    return f"a trailing comma at {at}, before '{text[err.pos]}' (JSON allows none: delete it)"


def _refuse_multiline_object(path: Union[str, Path], handle) -> None:
    """Raise a `DataFileError` that says so when the whole file is one JSON object written over several lines
    (its first line alone is not JSON); return when it is not."""
    handle.seek(0)
    try:
        value = json.load(handle)
    except json.JSONDecodeError:
        return
    if isinstance(value, dict):
        lists = [key for key, item in value.items() if isinstance(item, list) and item and isinstance(item[0], dict)]
        inner = f"; its key {lists[0]!r} holds a list: save that list as the file" if "conversations" not in value \
            and lists else ""
        raise DataFileError(f"{path} holds one JSON object written over several lines, not a JSON list of records "
                            f"nor one record per line (JSONL): wrap the record(s) in [ ... ]{inner}")


def _first_non_space(handle) -> str:
    while chunk := handle.read(4096):
        stripped = chunk.lstrip()
        if stripped:
            return stripped[0]
    return ""


class RecordStore:
    """Records as JSON bytes in one `uint8` buffer [total_bytes] with `offsets` [N + 1]."""

    def __init__(self, chunks: list[bytes]):
        self.offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([len(chunk) for chunk in chunks], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(chunks), dtype=np.uint8)

    @staticmethod
    def encode(record: Record) -> bytes:
        return json.dumps([record.id, record.images, [[m.role, m.content] for m in record.messages]],
                          ensure_ascii=False).encode()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Record:
        record_id, images, messages = json.loads(self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes())
        return Record(record_id, tuple(images), tuple(Message(role, content) for role, content in messages))
