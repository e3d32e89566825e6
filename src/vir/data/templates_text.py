"""Chat templates rendered as text, then tokenized once: `vicuna_v1`, `mistral_instruct`, `chatml`, `gemma`.

Each renders a conversation to pieces `(text, trained)` exactly as its model's published Jinja template does;
`encode_rendered` tokenizes the joined text in one call (`add_special_tokens=False`, as `apply_chat_template`
does) and labels the tokens whose character span ends inside a trained piece. One tokenization of the whole
text, so ids equal `tokenizer.apply_chat_template(messages)` even where a SentencePiece tokenizer would tokenize
a piece differently alone (the leading "▁" of Llama-2 / Mistral / Gemma vocabularies). Needs a fast tokenizer
(`return_offsets_mapping`).

Trained: each assistant reply and the end-of-turn token after it (`</s>`, `<|im_end|>`, `<end_of_turn>`), which
is what makes the model stop. Masked: bos, system text, user turns, role headers and separators, image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

from vir.data.conversation import IGNORE_INDEX, Message
from vir.utils.errors import UserError

# LLaVA-1.5's `conv_vicuna_v1` system prompt (haotian-liu/LLaVA llava/conversation.py), as LLaVA writes it.
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# What Qwen2.5-Instruct's published chat template writes when the conversation has no system turn.
QWEN2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

Pieces = list[tuple[str, bool]]


class TemplateError(UserError):
    """The chat template (`data.template`) cannot render with this tokenizer or conversation; one line."""


@dataclass(frozen=True)
class ImageSpec:
    """How `<image>` tags become ids: each `token` (one id, `token_id`, in the tokenizer) -> `count` copies."""

    token: str
    token_id: Optional[int]
    count: int


def encode_rendered(text: str, trained: Sequence[tuple[int, int]], tokenizer: PreTrainedTokenizerBase,
                    image: ImageSpec, template_name: str, strip_trailing_space: bool = False
                    ) -> tuple[list[int], list[int]]:
    """Tokenize `text` once and label it: a token is trained when its character span ends inside one of the
    `trained` spans `[start, end)`; each image token becomes `image.count` masked copies. Returns
    `(input_ids [T], labels [T])`. `strip_trailing_space` untrains whitespace-only tokens that end a span (the
    newline a template writes after an end-of-turn token belongs to the next turn)."""
    try:
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise TemplateError(f"data.template={template_name} needs a fast tokenizer (offset mapping); "
                            f"{type(tokenizer).__name__} is a slow one: load it with use_fast=True") from None
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    train = [any(start < end <= stop for start, stop in trained) for _, end in offsets]
    if strip_trailing_space:
        for k in [k for k in range(len(ids)) if train[k] and (k + 1 == len(ids) or not train[k + 1])]:
            while k >= 0 and train[k] and not text[offsets[k][0]:offsets[k][1]].strip():
                train[k] = False
                k -= 1
    input_ids: list[int] = []
    labels: list[int] = []
    for token_id, is_trained in zip(ids, train):
        if image.token_id is not None and token_id == image.token_id:
            input_ids.extend([token_id] * image.count)
            labels.extend([IGNORE_INDEX] * image.count)
        else:
            input_ids.append(token_id)
            labels.append(token_id if is_trained else IGNORE_INDEX)
    return input_ids, labels


def encode_pieces(pieces: Pieces, tokenizer: PreTrainedTokenizerBase, image: ImageSpec, template_name: str
                  ) -> tuple[list[int], list[int]]:
    """`encode_rendered` of the pieces' joined text, trained where the pieces say."""
    spans, position = [], 0
    for text, trained in pieces:
        if trained and text:
            spans.append((position, position + len(text)))
        position += len(text)
    return encode_rendered("".join(text for text, _ in pieces), spans, tokenizer, image, template_name)


def split_system(messages: Sequence[Message], system_prompt: Optional[str], default: str = ""
                 ) -> tuple[str, list[Message]]:
    """The system text (the conversation's system turn, else `system_prompt`, else `default`) and the turns."""
    if messages and messages[0].role == "system":
        return messages[0].content, list(messages[1:])
    return (system_prompt if system_prompt else default), list(messages)


class TextTemplate:
    """A template rendered as `(text, trained)` pieces; subclasses define `render`, `special_tokens` and
    `end_token` (the trained end-of-turn token, also what generation stops at)."""

    name = ""
    special_tokens: tuple[str, ...] = ()
    end_token = ""

    def render(self, messages: Sequence[Message], system_prompt: Optional[str], generation: bool) -> Pieces:
        raise NotImplementedError

    def required_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return list(self.special_tokens)

    def stop_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return [self.end_token]

    # A bos token put in front of the tokenized text by id, as `tokenizer(text)` adds it, rather than written
    # into the text: a SentencePiece tokenizer then starts the text with "▁", as it did in training.
    bos_by_id: Optional[str] = None

    def encode(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, image: ImageSpec,
               system_prompt: Optional[str]) -> tuple[list[int], list[int]]:
        ids, labels = encode_pieces(self.render(messages, system_prompt, False), tokenizer, image, self.name)
        if self.bos_by_id:
            bos_id = tokenizer.convert_tokens_to_ids(self.bos_by_id)
            ids, labels = [bos_id, *ids], [IGNORE_INDEX, *labels]
        return ids, labels

    def prompt_ids(self, messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase, image: ImageSpec,
                   system_prompt: Optional[str]) -> list[int]:
        ids = encode_pieces(self.render(messages, system_prompt, True), tokenizer, image, self.name)[0]
        return [tokenizer.convert_tokens_to_ids(self.bos_by_id), *ids] if self.bos_by_id else ids


class VicunaV1Template(TextTemplate):
    """LLaVA-1.5's `conv_vicuna_v1` (separator style TWO, sep " ", sep2 "</s>"), with bos first:
    `<s>{system} USER: {q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT:`.

    The system text is the conversation's system turn, else `data.system_prompt`, else LLaVA's
    `VICUNA_V1_SYSTEM`. The generation prompt ends with "ASSISTANT:" (no space), as LLaVA's `get_prompt`. The
    bos is put in by id and the text tokenized after it as one text, as LLaVA's `tokenizer_image_token` does.
    """

    name = "vicuna_v1"
    special_tokens = ("<s>", "</s>")
    end_token = "</s>"
    bos_by_id = "<s>"  # LLaVA tokenizes the prompt with bos added: "<s>", "▁A", "▁chat", ...

    def render(self, messages: Sequence[Message], system_prompt: Optional[str], generation: bool) -> Pieces:
        system, turns = split_system(messages, system_prompt, VICUNA_V1_SYSTEM)
        pieces: Pieces = []
        if system:
            pieces.append((system + " ", False))
        for message in turns:
            if message.role == "user":
                pieces.append((f"USER: {message.content} ", False))
            else:
                pieces += [("ASSISTANT: ", False), (message.content + "</s>", True)]
        if generation:
            pieces.append(("ASSISTANT:", False))
        return pieces


class MistralInstructTemplate(TextTemplate):
    """Mistral-7B-Instruct-v0.2's published template (tokenizer V1; the base LLaVA-NeXT's llava-v1.6-mistral-7b
    started from, whose own `conv_mistral_instruct` spaces its separators differently):
    `<s> [INST] {q} [/INST] {a}</s> [INST] {q2} [/INST]`. A system text (the system turn, else
    `data.system_prompt`; none by default) goes before the first question followed by a blank line, as the
    template does. The prompt for generation is the conversation up to " [/INST]" (the template has no
    separate generation prompt)."""

    name = "mistral_instruct"
    special_tokens = ("<s>", "</s>")
    end_token = "</s>"

    def render(self, messages: Sequence[Message], system_prompt: Optional[str], generation: bool) -> Pieces:
        system, turns = split_system(messages, system_prompt)
        pieces: Pieces = [("<s>", False)]
        for k, message in enumerate(turns):
            if message.role == "user":
                prefix = f"{system}\n\n" if k == 0 and system else ""
                pieces.append((f" [INST] {prefix}{message.content} [/INST]", False))
            else:
                pieces += [(" ", False), (message.content + "</s>", True)]
        return pieces


class ChatMLTemplate(TextTemplate):
    """Qwen2 / Qwen2.5 instruct (ChatML): `<|im_start|>{role}\\n{content}<|im_end|>\\n` per turn, no bos, and a
    system turn always first: the conversation's, else `data.system_prompt`, else Qwen2.5's default
    (`QWEN2_5_SYSTEM`), as Qwen2.5-Instruct's published template writes it."""

    name = "chatml"
    special_tokens = ("<|im_start|>", "<|im_end|>")
    end_token = "<|im_end|>"

    def render(self, messages: Sequence[Message], system_prompt: Optional[str], generation: bool) -> Pieces:
        system, turns = split_system(messages, system_prompt, QWEN2_5_SYSTEM)
        pieces: Pieces = [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]
        for message in turns:
            if message.role == "user":
                pieces.append((f"<|im_start|>user\n{message.content}<|im_end|>\n", False))
            else:
                pieces += [("<|im_start|>assistant\n", False), (message.content + "<|im_end|>", True),
                           ("\n", False)]
        if generation:
            pieces.append(("<|im_start|>assistant\n", False))
        return pieces


class GemmaTemplate(TextTemplate):
    """Gemma 2 instruct: `<bos><start_of_turn>user\\n{q.strip()}<end_of_turn>\\n<start_of_turn>model\\n
    {a.strip()}<end_of_turn>\\n`. Gemma has no system role and Gemma 2's published template raises on one;
    here a system text (the system turn, else `data.system_prompt`) is put before the first user turn's text
    followed by a blank line, as Gemma 3's published template does."""

    name = "gemma"
    special_tokens = ("<bos>", "<start_of_turn>", "<end_of_turn>")
    end_token = "<end_of_turn>"

    def render(self, messages: Sequence[Message], system_prompt: Optional[str], generation: bool) -> Pieces:
        system, turns = split_system(messages, system_prompt)
        pieces: Pieces = [("<bos>", False)]
        for k, message in enumerate(turns):
            if message.role == "user":
                prefix = f"{system}\n\n" if k == 0 and system else ""
                pieces.append((f"<start_of_turn>user\n{prefix}{message.content.strip()}<end_of_turn>\n", False))
            else:
                pieces += [("<start_of_turn>model\n", False), (message.content.strip() + "<end_of_turn>", True),
                           ("\n", False)]
        if generation:
            pieces.append(("<start_of_turn>model\n", False))
        return pieces
