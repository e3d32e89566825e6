"""Conversations: raw LLaVA / chat records -> immutable `Record`s. Pure functions, no I/O.

Step 1 of three, each testable alone (steps 2 and 3, rendering and truncation, are in `vir.data.templates`):

1. `normalize_record` turns one raw record (LLaVA `{id, image, conversations: [{from, value}]}` or chat-style
   `{role, content}` messages) into an immutable `Record`, or raises `InvalidRecordError` naming the record id
   and the reason. `<image>` tags are placed as LLaVA does: a record with images and no tag gets one tag per
   image in front of its first user turn; a record with tags must have exactly one per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from vir.utils.errors import UserError

IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
# LLaVA's `from` values and chat-style `role` values, mapped to one vocabulary.
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Message:
    """One turn. `role` is one of `ROLES`; `content` may hold `<image>` tags (user turns only)."""

    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """A validated conversation: `images` are paths relative to the image folder, one per `<image>` tag."""

    id: str
    images: tuple[str, ...]
    messages: tuple[Message, ...]

    @property
    def num_images(self) -> int:
        return len(self.images)


def tag_images(text: str, num_images: int, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """`text` with one `image_token` line per image in front, LLaVA's placement, unless it already holds a tag (the
    writer placed them) or there are no images. Training records, `vir-eval`, `vir-chat` and the web page all
    place tags through this (pure)."""
    if num_images and image_token not in text:
        return f"{image_token}\n" * num_images + text
    return text


class InvalidRecordError(UserError):
    """A record that cannot be trained on; `record_id` and `reason` say which and why."""

    def __init__(self, record_id: str, reason: str):
        super().__init__(record_id, reason)
        self.record_id = record_id
        self.reason = reason

    def __str__(self) -> str:
        return f"record {self.record_id!r}: {self.reason}"


MISSING_ID_PREFIX = "#"  # `#12`: the 13th record of its file, which had no id


def normalize_record(raw: Any, index: int, image_token: str = DEFAULT_IMAGE_TOKEN) -> Record:
    """Validate one raw record and return it as a `Record`; a record without an id (missing or null, or no object
    at all, such as `null`) is called `#<index>`, its position in the file, which no real id written as a number
    can collide with.

    Raises `InvalidRecordError(record_id, reason)` for: a non-object, no/empty conversation, an unknown role,
    non-string content, an empty turn, a system turn not first, a first non-system turn not from the user,
    roles not alternating user/assistant, no assistant turn, `image` not a string or list of strings, a tag in a
    system/assistant turn, or a number of `<image>` tags different from the number of images.
    """
    if not isinstance(raw, Mapping):  # `null`, a list, a number...: no id to read, so named by its position
        raise InvalidRecordError(f"{MISSING_ID_PREFIX}{index}", f"expected a JSON object, got {_json_type(raw)}")
    record_id = str(raw["id"]) if raw.get("id") is not None else f"{MISSING_ID_PREFIX}{index}"

    def invalid(reason: str) -> InvalidRecordError:
        return InvalidRecordError(record_id, reason)

    turns = raw["conversations"] if "conversations" in raw else raw.get("messages")
    if turns is None:
        raise invalid("no 'conversations' (or 'messages') list")
    if not isinstance(turns, list):
        raise invalid(f"'conversations' must be a list, got {_json_type(turns)}")
    if not turns:
        raise invalid("empty conversation")
    messages = [_normalize_turn(turn, k, invalid) for k, turn in enumerate(turns)]
    images = _normalize_images(raw["image"] if "image" in raw else raw.get("images"), invalid)
    _check_turn_order(messages, invalid)
    messages = _place_image_tags(messages, len(images), image_token, invalid)
    for k, message in enumerate(messages):
        if not message.content.strip():
            raise invalid(f"turn {k} ({message.role}) is empty")
    return Record(id=record_id, images=images, messages=tuple(messages))


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
               float: "a number", type(None): "null"}


def _json_type(value: Any) -> str:
    """What `value` is, in JSON's words (`null`, `an array`...), for messages about the user's file."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _normalize_turn(turn: Any, k: int, invalid) -> Message:
    if not isinstance(turn, Mapping):
        raise invalid(f"turn {k} is not an object")
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in ROLE_ALIASES:
        raise invalid(f"turn {k}: unknown role {role!r} (expected human/gpt/system or user/assistant/system)")
    if not isinstance(content, str):
        raise invalid(f"turn {k}: content must be a string, got {_json_type(content)}")
    return Message(ROLE_ALIASES[role], content)


def _normalize_images(image: Any, invalid) -> tuple[str, ...]:
    if image is None:
        return ()
    if isinstance(image, str):
        return (image,)
    if isinstance(image, list) and all(isinstance(path, str) for path in image):
        return tuple(image)
    raise invalid("'image' must be a path or a list of paths")


def _check_turn_order(messages: list[Message], invalid) -> None:
    body = messages[1:] if messages[0].role == "system" else messages
    if not body:
        raise invalid("no user turn")
    for k, message in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if message.role == "system":
            raise invalid("a system turn may only come first")
        if message.role != expected:
            index = k + len(messages) - len(body)
            if k == 0:
                raise invalid(f"the first non-system turn (turn {index}) is {message.role}, expected {expected}")
            raise invalid(f"roles do not alternate user/assistant: turn {index} is {message.role}, expected {expected}")
    if len(body) < 2:
        raise invalid("no assistant turn")


def _place_image_tags(messages: list[Message], num_images: int, image_token: str, invalid) -> list[Message]:
    counts = [m.content.count(image_token) for m in messages]
    for k, (message, count) in enumerate(zip(messages, counts)):
        if count and message.role != "user":
            raise invalid(f"{image_token} tag in {message.role} turn {k}")
    if sum(counts) == 0 and num_images:
        first_user = next(k for k, m in enumerate(messages) if m.role == "user")
        tagged = Message("user", tag_images(messages[first_user].content, num_images, image_token))
        return messages[:first_user] + [tagged] + messages[first_user + 1 :]
    if sum(counts) != num_images:
        raise invalid(f"{sum(counts)} {image_token} tag(s) but {num_images} image(s)")
    return messages
