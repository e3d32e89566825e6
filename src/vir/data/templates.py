"""Rendering and truncation: `Record` / messages -> (input_ids, labels) -> cut to fit. Pure functions, no I/O.

Steps 2 and 3 of the conversation pipeline (step 1, `normalize_record`, is in `vir.data.conversation`):

2. `build_example` renders a `Record` with a chat template (`TEMPLATES`) segment by segment: every text piece is
   tokenized alone with `add_special_tokens=False` and special tokens are inserted by id, so labels line up with
   ids by construction (no "tokenization mismatch"). Each `<image>` becomes `num_image_tokens` copies of
   `image_token_id`, expanded here at tokenisation time as transformers' Llava does.
3. `truncate_example` cuts to `model_max_length` without ever cutting through an image block, or says why the
   sample cannot be trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from transformers import PreTrainedTokenizerBase

from vir.data.conversation import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, ROLE_ALIASES, Message, Record

# Llama-3's special tokens, in Llama-3's order (ids 128000.. in Meta's tokenizer).
BEGIN_OF_TEXT = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
FINETUNE_PAD = "<|finetune_right_pad_id|>"

LLAMA3_SPECIAL_TOKENS = [
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    FINETUNE_PAD,
    "<|reserved_special_token_2|>",
    START_HEADER,
    END_HEADER,
    "<|eom_id|>",
    EOT,
    "<|python_tag|>",
]

# The chat template shipped with Meta-Llama-3-*-Instruct.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

SKIP_IMAGES_DO_NOT_FIT = "images_do_not_fit"
SKIP_NO_TRAINED_TOKENS = "no_trained_tokens"


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
