"""Conversations: raw LLaVA / chat records -> `Record` -> (input_ids, labels). Pure functions, no I/O.

Three steps, each testable alone:

1. `normalize_record` turns one raw record (LLaVA `{id, image, conversations: [{from, value}]}` or chat-style
   `{role, content}` messages) into an immutable `Record`, or raises `InvalidRecordError` naming the record id
   and the reason. `<image>` tags are placed as LLaVA does: a record with images and no tag gets one tag per
   image in front of its first user turn; a record with tags must have exactly one per image.
2. `build_example` renders a `Record` with a chat template (`TEMPLATES`) segment by segment: every text piece is
   tokenized alone with `add_special_tokens=False` and special tokens are inserted by id, so labels line up with
   ids by construction (no "tokenization mismatch"). Each `<image>` becomes `num_image_tokens` copies of
   `image_token_id`, expanded here at tokenisation time as transformers' Llava does.
3. `truncate_example` cuts to `model_max_length` without ever cutting through an image block, or says why the
   sample cannot be trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from transformers import PreTrainedTokenizerBase

from vir.models.tokenizer import BEGIN_OF_TEXT, END_HEADER, EOT, START_HEADER

IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")
# LLaVA's `from` values and chat-style `role` values, mapped to one vocabulary.
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

SKIP_IMAGES_DO_NOT_FIT = "images_do_not_fit"
SKIP_NO_TRAINED_TOKENS = "no_trained_tokens"


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


class InvalidRecordError(ValueError):
    """A record that cannot be trained on; `record_id` and `reason` say which and why."""

    def __init__(self, record_id: str, reason: str):
        super().__init__(record_id, reason)
        self.record_id = record_id
        self.reason = reason

    def __str__(self) -> str:
        return f"record {self.record_id!r}: {self.reason}"


def normalize_record(raw: Any, index: int, image_token: str = DEFAULT_IMAGE_TOKEN) -> Record:
    """Validate one raw record and return it as a `Record`; `index` is its id when it has none.

    Raises `InvalidRecordError(record_id, reason)` for: a non-object, no/empty conversation, an unknown role,
    non-string content, an empty turn, a system turn not first, a first non-system turn not from the user,
    roles not alternating user/assistant, no assistant turn, `image` not a string or list of strings, a tag in a
    system/assistant turn, or a number of `<image>` tags different from the number of images.
    """
    if not isinstance(raw, Mapping):
        raise InvalidRecordError(str(index), f"expected a JSON object, got {type(raw).__name__}")
    record_id = str(raw["id"]) if raw.get("id") is not None else str(index)

    def invalid(reason: str) -> InvalidRecordError:
        return InvalidRecordError(record_id, reason)

    turns = raw["conversations"] if "conversations" in raw else raw.get("messages")
    if turns is None:
        raise invalid("no 'conversations' (or 'messages') list")
    if not isinstance(turns, list):
        raise invalid(f"'conversations' must be a list, got {type(turns).__name__}")
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


def _normalize_turn(turn: Any, k: int, invalid) -> Message:
    if not isinstance(turn, Mapping):
        raise invalid(f"turn {k} is not an object")
    role = turn.get("from", turn.get("role"))
    content = turn.get("value", turn.get("content"))
    if role not in ROLE_ALIASES:
        raise invalid(f"turn {k}: unknown role {role!r} (expected human/gpt/system or user/assistant/system)")
    if not isinstance(content, str):
        raise invalid(f"turn {k}: content must be a string, got {type(content).__name__}")
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
            where = "first non-system turn" if k == 0 else "roles do not alternate user/assistant:"
            raise invalid(f"{where} turn {k + len(messages) - len(body)} is {message.role}, expected {expected}")
    if len(body) < 2:
        raise invalid("no assistant turn")


def _place_image_tags(messages: list[Message], num_images: int, image_token: str, invalid) -> list[Message]:
    counts = [m.content.count(image_token) for m in messages]
    for k, (message, count) in enumerate(zip(messages, counts)):
        if count and message.role != "user":
            raise invalid(f"{image_token} tag in {message.role} turn {k}")
    if sum(counts) == 0 and num_images:
        first_user = next(k for k, m in enumerate(messages) if m.role == "user")
        tagged = Message("user", f"{image_token}\n" * num_images + messages[first_user].content)
        return messages[:first_user] + [tagged] + messages[first_user + 1 :]
    if sum(counts) != num_images:
        raise invalid(f"{sum(counts)} {image_token} tag(s) but {num_images} image(s)")
    return messages


class _SequenceBuilder:
    """Accumulates `input_ids` and `labels` one segment at a time."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, image_token: str, image_token_id: int, num_image_tokens: int
    ):
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.input_ids: list[int] = []
        self.labels: list[int] = []

    def _append(self, ids: Sequence[int], train: bool) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(ids if train else [IGNORE_INDEX] * len(ids))

    def special(self, token: str, train: bool) -> None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(f"the tokenizer has no {token!r} token, which this chat template needs")
        self._append([token_id], train)

    def text(self, text: str, train: bool) -> None:
        if text:
            self._append(self.tokenizer(text, add_special_tokens=False)["input_ids"], train)

    def image_block(self) -> None:
        self._append([self.image_token_id] * self.num_image_tokens, train=False)

    def content(self, text: str, train: bool) -> None:
        """Text with `<image>` tags: each tag becomes an (always masked) image block."""
        for k, piece in enumerate(text.split(self.image_token)):
            if k:
                self.image_block()
            self.text(piece, train)


class Llama3Template:
    """Llama-3 instruct: `<|begin_of_text|>` + per message
    `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`.

    Trained: each assistant turn's content and its closing `<|eot_id|>`. Masked: bos, system and user turns,
    every role header (the assistant's too, with its "\\n\\n") and image tokens. Ids equal the tokenizer's
    `apply_chat_template` when `num_image_tokens == 1`.
    """

    name = "llama3"

    def build(self, messages: Sequence[Message], seq: _SequenceBuilder, system_prompt: Optional[str]) -> None:
        if system_prompt and messages[0].role != "system":
            messages = [Message("system", system_prompt), *messages]
        seq.special(BEGIN_OF_TEXT, train=False)
        for message in messages:
            train = message.role == "assistant"
            seq.special(START_HEADER, train=False)
            seq.text(message.role, train=False)
            seq.special(END_HEADER, train=False)
            seq.text("\n\n", train=False)
            seq.content(message.content.strip(), train)
            seq.special(EOT, train)


class PlainTemplate:
    """LLaVA stage-1 alignment (`preprocess_plain`): bos, the image blocks, the first assistant reply, eos.

    The first user turn contributes only its `<image>` tags; its text is dropped, as in LLaVA. Later turns and
    any system prompt are ignored. Trained: the reply and the closing eos (`tokenizer.eos_token`).
    """

    name = "plain"

    def build(self, messages: Sequence[Message], seq: _SequenceBuilder, system_prompt: Optional[str]) -> None:
        user = next((k for k, m in enumerate(messages) if m.role == "user"), None)
        reply = None if user is None else next((m for m in messages[user + 1 :] if m.role == "assistant"), None)
        if reply is None:
            raise ValueError("the plain template needs a user turn followed by an assistant reply")
        seq.special(seq.tokenizer.bos_token or BEGIN_OF_TEXT, train=False)
        for _ in range(messages[user].content.count(seq.image_token)):
            seq.image_block()
        seq.text(reply.content.strip(), train=True)
        seq.special(seq.tokenizer.eos_token or EOT, train=True)


TEMPLATES = {"llama3": Llama3Template(), "plain": PlainTemplate()}
ChatTemplate = Union[Llama3Template, PlainTemplate]


def get_template(name: str) -> ChatTemplate:
    """The template registered under `name` (config key `data.template`)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r} (data.template); choices: {sorted(TEMPLATES)}") from None


def _as_messages(messages: Sequence[Union[Message, Mapping[str, str]]]) -> list[Message]:
    """`Message`s from `Message`s or `{role, content}` dicts (roles as in `ROLE_ALIASES`)."""
    return [m if isinstance(m, Message) else Message(ROLE_ALIASES[m["role"]], m["content"]) for m in messages]


def build_example(
    record_or_messages: Union[Record, Sequence[Union[Message, Mapping[str, str]]]],
    tokenizer: PreTrainedTokenizerBase,
    template: Union[str, ChatTemplate],
    image_token_id: int,
    num_image_tokens: int,
    system_prompt: Optional[str] = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
) -> tuple[list[int], list[int]]:
    """Render a conversation to `(input_ids [T], labels [T])`, labels `IGNORE_INDEX` where not trained.

    `record_or_messages` is a `Record` or a list of `Message`s / `{role, content}` dicts (roles as in
    `ROLE_ALIASES`). Each `image_token` tag becomes `num_image_tokens` copies of `image_token_id`.
    `system_prompt` is used only when the conversation has no system turn (llama3 template).
    """
    messages = record_or_messages.messages if isinstance(record_or_messages, Record) else record_or_messages
    messages = _as_messages(messages)
    if not messages:
        raise ValueError("cannot build an example from an empty conversation")
    template = get_template(template) if isinstance(template, str) else template
    seq = _SequenceBuilder(tokenizer, image_token, image_token_id, num_image_tokens)
    template.build(messages, seq, system_prompt)
    return seq.input_ids, seq.labels


def build_generation_prompt(
    messages: Sequence[Union[Message, Mapping[str, str]]],
    tokenizer: PreTrainedTokenizerBase,
    template: Union[str, ChatTemplate],
    image_token_id: int,
    num_image_tokens: int,
    system_prompt: Optional[str] = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
) -> list[int]:
    """Prompt ids for generating the next assistant turn after `messages` (which end with a user turn).

    Rendered by the same template as training: the conversation plus an empty assistant reply, minus that
    reply's closing end token. For llama3 this is exactly `apply_chat_template(..., add_generation_prompt=True)`
    (ids end with the assistant header and "\n\n"); for plain it is bos + image blocks.
    """
    messages = _as_messages(messages)
    if not messages or messages[-1].role != "user":
        raise ValueError("a generation prompt needs a conversation that ends with a user turn")
    input_ids, _ = build_example([*messages, Message("assistant", "")], tokenizer, template, image_token_id,
                                 num_image_tokens, system_prompt, image_token)
    return input_ids[:-1]


@dataclass(frozen=True)
class TruncationResult:
    """`input_ids`/`labels` cut to fit, or (when `skip_reason` is set) returned uncut for inspection."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    skip_reason: Optional[str] = None


def truncate_example(
    input_ids: Sequence[int], labels: Sequence[int], max_length: int, image_token_id: int, num_image_tokens: int
) -> TruncationResult:
    """Cut `input_ids`/`labels` ([T]) to at most `max_length` tokens without cutting into an image block.

    Skips (sets `skip_reason`) instead of cutting when the cut would drop or split an image block, since the
    model would then see fewer image slots than images (`SKIP_IMAGES_DO_NOT_FIT`), and when no label is left
    to train (`SKIP_NO_TRAINED_TOKENS`).
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids ({len(input_ids)}) and labels ({len(labels)}) differ in length")
    num_image_ids = sum(1 for token_id in input_ids if token_id == image_token_id)
    if num_image_ids % num_image_tokens:
        raise ValueError(f"{num_image_ids} image tokens is not a multiple of num_image_tokens={num_image_tokens}")
    input_ids, labels = list(input_ids), list(labels)
    truncated = len(input_ids) > max_length
    if truncated and image_token_id in input_ids[max_length:]:
        return TruncationResult(input_ids, labels, truncated, SKIP_IMAGES_DO_NOT_FIT)
    if all(label == IGNORE_INDEX for label in labels[:max_length]):
        return TruncationResult(input_ids, labels, truncated, SKIP_NO_TRAINED_TOKENS)
    return TruncationResult(input_ids[:max_length], labels[:max_length], truncated)
