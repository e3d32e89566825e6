"""Rendering and truncation: `Record` / messages -> (input_ids, labels) -> cut to fit. Pure functions, no I/O.

Steps 2 and 3 of the conversation pipeline (step 1, `normalize_record`, is in `vir.data.conversation`):

2. `build_example` renders a `Record` with a chat template (`TEMPLATES`, config key `data.template`), each the
   convention a LLaVA-family checkpoint was trained with:
   - `llama3` and `plain` (LLaVA stage 1), here, segment by segment: every text piece is tokenized alone with
     `add_special_tokens=False` and special tokens are inserted by id (every boundary is a special token);
   - `vicuna_v1` (LLaVA-1.5), `mistral_instruct` (LLaVA-NeXT Mistral), `chatml` (Qwen2/2.5), `gemma` (Gemma 2),
     in `vir.data.templates_text`: rendered as text and tokenized once, labels from character offsets;
   - `auto`, in `vir.data.templates_auto`: the tokenizer's own Jinja `chat_template`.
   Labels line up with ids by construction (no "tokenization mismatch"), and ids equal the model's published
   `apply_chat_template` (tested against each published template). Each `<image>` becomes `num_image_tokens`
   copies of `image_token_id`, expanded here at tokenisation time as transformers' Llava does.
3. `truncate_example` cuts to `model_max_length` without ever cutting through an image block, or says why the
   sample cannot be trained.

`check_template(name, tokenizer)` says before any data is read whether a template can render with a tokenizer;
`generation_stop_ids` is what generation stops at (the template's end-of-turn token, eos, the model's eos ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from transformers import PreTrainedTokenizerBase

from vir.data.conversation import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, ROLE_ALIASES, Message, Record
from vir.data.templates_auto import AutoTemplate
from vir.data.templates_text import (
    ChatMLTemplate,
    GemmaTemplate,
    ImageSpec,
    MistralInstructTemplate,
    TemplateError,
    VicunaV1Template,
)

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


class _SegmentTemplate:
    """A template built segment by segment with `_SequenceBuilder`; subclasses define `build`."""

    name = ""

    def build(self, messages: Sequence[Message], seq: _SequenceBuilder, system_prompt: Optional[str]) -> None:
        raise NotImplementedError

    def encode(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, image: ImageSpec,
               system_prompt: Optional[str]) -> tuple[list[int], list[int]]:
        seq = _SequenceBuilder(tokenizer, image.token, image.token_id, image.count)
        self.build(messages, seq, system_prompt)
        return seq.input_ids, seq.labels

    def prompt_ids(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, image: ImageSpec,
                   system_prompt: Optional[str]) -> list[int]:
        # The conversation plus an empty reply, minus that reply's closing end token.
        return self.encode([*messages, Message("assistant", "")], tokenizer, image, system_prompt)[0][:-1]


class Llama3Template(_SegmentTemplate):
    """Llama-3 instruct: `<|begin_of_text|>` + per message
    `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`.

    Trained: each assistant turn's content and its closing `<|eot_id|>`. Masked: bos, system and user turns,
    every role header (the assistant's too, with its "\\n\\n") and image tokens. Ids equal the tokenizer's
    `apply_chat_template` when `num_image_tokens == 1`.
    """

    name = "llama3"

    def required_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT]

    def stop_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [EOT]

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


class PlainTemplate(_SegmentTemplate):
    """LLaVA stage-1 alignment (`preprocess_plain`): bos, the image blocks, the first assistant reply, eos.

    The first user turn contributes only its `<image>` tags; its text is dropped, as in LLaVA. Later turns and
    any system prompt are ignored. Trained: the reply and the closing eos (`tokenizer.eos_token`). A tokenizer
    with no bos token (Qwen's) gets none.
    """

    name = "plain"

    def required_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [token for token in (tokenizer.bos_token, tokenizer.eos_token) if token]

    def stop_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [tokenizer.eos_token] if tokenizer.eos_token else []

    def build(self, messages: Sequence[Message], seq: _SequenceBuilder, system_prompt: Optional[str]) -> None:
        user = next((k for k, m in enumerate(messages) if m.role == "user"), None)
        reply = None if user is None else next((m for m in messages[user + 1 :] if m.role == "assistant"), None)
        if reply is None:
            raise ValueError("the plain template needs a user turn followed by an assistant reply")
        if seq.tokenizer.eos_token is None:
            raise TemplateError("data.template=plain: the tokenizer has no eos token to end the caption with")
        if seq.tokenizer.bos_token:
            seq.special(seq.tokenizer.bos_token, train=False)
        for _ in range(messages[user].content.count(seq.image_token)):
            seq.image_block()
        seq.text(reply.content.strip(), train=True)
        seq.special(seq.tokenizer.eos_token, train=True)


TEMPLATES = {
    template.name: template
    for template in (Llama3Template(), PlainTemplate(), VicunaV1Template(), MistralInstructTemplate(),
                     ChatMLTemplate(), GemmaTemplate(), AutoTemplate())
}
ChatTemplate = Union[Llama3Template, PlainTemplate, VicunaV1Template, MistralInstructTemplate, ChatMLTemplate,
                     GemmaTemplate, AutoTemplate]
# Templates named after a family, whose special tokens tell which tokenizers they fit (suggested on a mismatch).
FAMILY_TEMPLATES = ("llama3", "vicuna_v1", "mistral_instruct", "chatml", "gemma")


def get_template(name: str) -> ChatTemplate:
    """The template registered under `name` (config key `data.template`)."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise TemplateError(f"unknown chat template {name!r} (data.template); choices: {', '.join(TEMPLATES)}"
                            ) from None


def _missing_tokens(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    missing = []
    for token in template.required_tokens(tokenizer):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
            missing.append(token)
    return missing


def check_template(template: Union[str, ChatTemplate], tokenizer: PreTrainedTokenizerBase) -> ChatTemplate:
    """Raise `TemplateError` (one line naming `data.template`) when `template` cannot render with `tokenizer`:
    an unknown name, a special token the template writes that the tokenizer lacks (suggesting `auto` when the
    tokenizer has a chat template, and the named templates whose tokens it has), or `auto` with no chat
    template. Returns the template. Cheap; call it before reading any data."""
    template = get_template(template) if isinstance(template, str) else template
    if isinstance(template, AutoTemplate):
        template.check_tokenizer(tokenizer, [name for name in TEMPLATES if name != "auto"])
        return template
    missing = _missing_tokens(template, tokenizer)
    if missing:
        fits = [name for name in FAMILY_TEMPLATES if name != template.name
                and not _missing_tokens(TEMPLATES[name], tokenizer)]
        hints = (["data.template=auto (the tokenizer's own chat template)"] if getattr(tokenizer, "chat_template",
                                                                                       None) else [])
        hints += [f"data.template={name}" for name in fits]
        hint = f"; use {' or '.join(hints)}" if hints else ""
        raise TemplateError(f"data.template={template.name}: the tokenizer has no {missing[0]!r} token, which "
                            f"this template writes{hint}")
    return template


def generation_stop_ids(template: Union[str, ChatTemplate], tokenizer: PreTrainedTokenizerBase,
                        generation_config=None) -> list[int]:
    """What generation stops at: the template's end-of-turn token(s), the tokenizer's eos and every eos id of
    `generation_config` (an int or a list), de-duplicated in that order."""
    template = get_template(template) if isinstance(template, str) else template
    ids = [tokenizer.convert_tokens_to_ids(token) for token in template.stop_tokens(tokenizer)]
    ids.append(tokenizer.eos_token_id)
    config_eos = getattr(generation_config, "eos_token_id", None)
    ids.extend(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    unk = tokenizer.unk_token_id
    return list(dict.fromkeys(int(i) for i in ids if i is not None and (i != unk or unk is None)))


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
    `system_prompt` (`data.system_prompt`) is used only when the conversation has no system turn; it replaces a
    template's default system text (vicuna_v1's, chatml's). Raises `TemplateError` when the template cannot
    render with `tokenizer` (`check_template`).
    """
    messages = record_or_messages.messages if isinstance(record_or_messages, Record) else record_or_messages
    messages = _as_messages(messages)
    if not messages:
        raise ValueError("cannot build an example from an empty conversation")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    template = check_template(template, tokenizer)
    return template.encode(messages, tokenizer, ImageSpec(image_token, image_token_id, num_image_tokens),
                           system_prompt)


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

    Rendered by the same template as training; equal to the tokenizer's `apply_chat_template(...,
    add_generation_prompt=True)` for the template's published Jinja (llama3: ids end with the assistant header
    and "\\n\\n"; plain: bos + image blocks; mistral_instruct: the conversation up to " [/INST]").
    """
    messages = _as_messages(messages)
    if not messages or messages[-1].role != "user":
        raise ValueError("a generation prompt needs a conversation that ends with a user turn")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    template = check_template(template, tokenizer)
    return template.prompt_ids(messages, tokenizer, ImageSpec(image_token, image_token_id, num_image_tokens),
                               system_prompt)


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
