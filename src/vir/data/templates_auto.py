"""`data.template=auto`: the tokenizer's own chat template (`tokenizer.chat_template`, Jinja), with assistant-only
labels and no per-family code.

The conversation is rendered with `apply_chat_template(..., tokenize=False)` and tokenized once. Which characters
are trained is found by rendering prefixes: reply k starts where `messages[:k]` with the generation prompt ends,
and ends where `messages[:k+1]` stops agreeing with the whole conversation (also rendered with a probe user turn
after it, for templates that close a conversation with an extra token such as Phi-3's eos). So the reply and the
end-of-turn text the template writes after it (`<|eot_id|>`, `<|im_end|>`, `<|end|>`, ...) are trained; the
whitespace after it, every header, system and user text are not. Image tags stay in the text: `<image>` is a
special token of the tokenizer, and each one becomes `num_image_tokens` masked copies.

Templates that read content as a list of typed parts (llava-hf's processors' templates: `{"type": "image"}`,
`{"type": "text", ...}`) are detected (a string content renders to nothing) and given parts instead.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Sequence

from transformers import PreTrainedTokenizerBase

from vir.data.conversation import Message
from vir.data.templates_text import ImageSpec, TemplateError, encode_rendered

logger = logging.getLogger(__name__)

_PROBE = "vir-probe-7f3a9c"  # content that no real conversation holds (and that `trim` keeps)


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


@functools.lru_cache(maxsize=32)
def reads_typed_parts(chat_template: str) -> bool:
    """Whether `chat_template` ignores string content (it iterates `message['content']` as typed parts)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[[{"role": "user", "content": _PROBE}]],
                                            chat_template=chat_template)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain user turn is reported when used
        return False
    return _PROBE not in rendered[0]


def as_parts(content: str, image_token: str) -> list[dict]:
    """`<image>` tags and text as typed parts in order, as llava-hf processors take them (the newline after a
    tag belongs to the tag: their templates write `<image>\\n`)."""
    parts: list[dict] = []
    for k, piece in enumerate(content.split(image_token)):
        if k:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.lstrip("\n") if k else piece})
    return parts


class AutoTemplate:
    """The tokenizer's own chat template (see module doc)."""

    name = "auto"

    def required_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return []

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, choices: Sequence[str]) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("data.template=auto: the tokenizer has no chat template (tokenizer.chat_template "
                                f"is not set); name one of the templates instead: {', '.join(choices)}")

    def _dicts(self, messages: Sequence[Message], tokenizer, image: ImageSpec, system_prompt: Optional[str]
               ) -> list[dict]:
        if system_prompt and (not messages or messages[0].role != "system"):
            messages = [Message("system", system_prompt), *messages]
        if reads_typed_parts(tokenizer.chat_template):
            return [{"role": m.role, "content": as_parts(m.content, image.token)} for m in messages]
        return [{"role": m.role, "content": m.content} for m in messages]

    def _render(self, tokenizer, dicts: list[dict], generation: bool) -> str:
        try:
            return tokenizer.apply_chat_template(dicts, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # noqa: BLE001 - jinja's raise_exception and template bugs alike
            message = " ".join(str(err).split())
            raise TemplateError(f"data.template=auto: the tokenizer's chat template refused the conversation "
                                f"({type(err).__name__}: {message})") from None

    def spans(self, tokenizer, dicts: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans `[start, end)` of each assistant reply."""
        full = self._render(tokenizer, dicts, False)
        spans = []
        for k, message in enumerate(dicts):
            if message["role"] != "assistant":
                continue
            start = _common_prefix(self._render(tokenizer, dicts[:k], True), full)
            end = _common_prefix(self._render(tokenizer, dicts[: k + 1], False), full)
            try:
                probe = self._render(tokenizer, [*dicts[: k + 1], {"role": "user", "content": _PROBE}], False)
                end = min(end, _common_prefix(probe, full))
            except TemplateError:
                pass
            if end > start:
                spans.append((start, end))
        return full, spans

    def encode(self, messages: Sequence[Message], tokenizer, image: ImageSpec, system_prompt: Optional[str]
               ) -> tuple[list[int], list[int]]:
        text, spans = self.spans(tokenizer, self._dicts(messages, tokenizer, image, system_prompt))
        ids, labels = encode_rendered(text, spans, tokenizer, image, self.name, strip_trailing_space=True)
        self._check_images(messages, ids, image)
        return ids, labels

    def prompt_ids(self, messages: Sequence[Message], tokenizer, image: ImageSpec, system_prompt: Optional[str]
                   ) -> list[int]:
        text = self._render(tokenizer, self._dicts(messages, tokenizer, image, system_prompt), True)
        ids, _ = encode_rendered(text, [], tokenizer, image, self.name)
        self._check_images(messages, ids, image)
        return ids

    def _check_images(self, messages: Sequence[Message], ids: list[int], image: ImageSpec) -> None:
        tags = sum(m.content.count(image.token) for m in messages)
        found = sum(1 for token_id in ids if token_id == image.token_id) // image.count if tags else 0
        if found != tags:
            raise TemplateError(f"data.template=auto: the tokenizer's chat template turned {tags} {image.token} "
                                f"tag(s) into {found}; use a named template (data.template) for this model")

    def stop_tokens(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The special tokens the template writes after an assistant reply (its end-of-turn token), found by
        rendering a one-exchange probe; empty when it writes none (then only eos stops generation)."""
        dicts = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        if reads_typed_parts(tokenizer.chat_template):
            dicts = [{"role": d["role"], "content": as_parts(d["content"], "<image>")} for d in dicts]
        text, spans = self.spans(tokenizer, dicts)
        if not spans:
            return []
        start, end = spans[0]
        reply_end = text.find("Hello", start) + len("Hello")
        special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
        tail = text[reply_end:end]
        return [token for token in special if token and token in tail]
