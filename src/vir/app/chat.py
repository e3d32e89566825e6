"""The chat engine behind the page, with no server: a conversation of turns (text + images) in, a stream of
partial answers out.

Prompts are built by the run's own template (`ChatModel.encode`), images are opened with
`vir.data.images.open_user_image`, `model.generate` runs in a thread feeding transformers'
`TextIteratorStreamer`. Temperature 0 is greedy with the arguments `generate_answers` uses, so the final text
equals `vir-eval`'s answer for the same question and image. Anything a user can get wrong raises
`ChatInputError` with a message for the page, before any token is generated.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from vir.app.loading import ChatModel
from vir.data.conversation import Message, tag_images
from vir.data.images import open_user_image
from vir.utils.errors import UserError

MAX_PROMPT_CHARS = 20_000  # far past any context here; refused before tokenising


class ChatInputError(UserError):
    """Input the page must answer with a message (empty prompt, bad image, too long a prompt)."""


@dataclass
class Turn:
    """One exchange: the user's text, the images sent with it (opened, RGB), the answer (None: pending) and the
    images' files (what the page shows)."""

    text: str
    images: List[Image.Image] = field(default_factory=list)
    answer: Optional[str] = None
    sources: List[str] = field(default_factory=list)


@dataclass
class Sampling:
    """Decoding settings; `temperature == 0` is greedy (and ignores `top_p`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 64


def open_images(paths: Sequence[Union[str, Path]], min_side: Optional[int] = None) -> List[Image.Image]:
    """Uploaded files as RGB images, or ChatInputError naming the file that is missing, not an image,
    corrupt or too large. `min_side` (the model's input side) reduces large images as training and `vir-eval`
    do."""
    images = []
    for path in paths:
        try:
            images.append(open_user_image(path, min_side))
        except UserError as err:
            raise ChatInputError(f"Cannot use the upload {Path(path).name}: {_reason(err, path)}") from None
    return images


def _reason(err: Exception, path) -> str:
    text = str(err)
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


class _StopWhen(StoppingCriteria):
    """Ends generation once `event` is set (the caller stopped reading)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatEngine:
    """Streams answers from a `ChatModel`; one generation at a time (a lock), history kept by the caller."""

    def __init__(self, chat_model: ChatModel, stream_timeout_s: float = 600.0):
        self.cm = chat_model
        self.stream_timeout_s = stream_timeout_s
        self._lock = threading.Lock()

    def messages(self, turns: Sequence[Turn]) -> tuple[List[Message], List[Image.Image]]:
        """The conversation as template messages (image tags in front of each turn's text, one per image, as
        `question_query` puts them) and all its images in tag order."""
        tag = self.cm.image_token
        messages, images = [], []
        for turn in turns:
            messages.append(Message("user", tag_images(turn.text, len(turn.images), tag)))
            images.extend(turn.images)
            if turn.answer is not None:
                messages.append(Message("assistant", turn.answer))
        return messages, images

    def prepare(self, turns: Sequence[Turn], sampling: Sampling) -> tuple[dict, int]:
        """Validated `generate` inputs and the number of new tokens that still fit in the context."""
        if not turns or turns[-1].answer is not None:
            raise ChatInputError("There is no question to answer.")
        last = turns[-1]
        if not last.text.strip():
            raise ChatInputError("The prompt is empty: type a question.")
        if sum(len(t.text) for t in turns) > MAX_PROMPT_CHARS:
            raise ChatInputError(f"The conversation is longer than {MAX_PROMPT_CHARS} characters: press Clear "
                                 "and ask again.")
        tag = self.cm.image_token
        if last.images and last.text.count(tag) not in (0, len(last.images)):
            raise ChatInputError(f"The prompt has {last.text.count(tag)} {tag} tags for {len(last.images)} images.")
        messages, images = self.messages(turns)
        inputs = self.cm.encode(messages, images)
        length = int(inputs["input_ids"].shape[1])
        room = self.cm.context_length - length
        if room < 1:
            n_images = len(images)
            per_image = f" ({n_images} image(s), {self.cm.num_image_tokens} tokens each)" if n_images else ""
            raise ChatInputError(f"The prompt is {length} tokens{per_image}; the model's context is "
                                 f"{self.cm.context_length} tokens. Press Clear or ask a shorter question.")
        if sampling.max_new_tokens < 1:
            raise ChatInputError("max new tokens must be at least 1.")
        return inputs, min(int(sampling.max_new_tokens), room)

    def stream(self, turns: Sequence[Turn], sampling: Sampling = Sampling()) -> Iterator[str]:
        """Yield the answer to the last turn as it grows; the last value is the whole answer (decoded from the
        generated ids, special tokens stripped, as `generate_answers` decodes)."""
        inputs, max_new_tokens = self.prepare(turns, sampling)
        cm = self.cm
        streamer = TextIteratorStreamer(cm.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=self.stream_timeout_s)
        kwargs = dict(inputs, max_new_tokens=max_new_tokens, eos_token_id=cm.stop_ids,
                      pad_token_id=cm.pad_id, streamer=streamer)
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(sampling.temperature), top_p=float(sampling.top_p))
        else:
            kwargs.update(do_sample=False)
        result: dict = {}

        def run():
            try:
                with torch.no_grad():
                    result["ids"] = cm.model.generate(**kwargs)
            except Exception as err:  # noqa: BLE001 - reported to the page below, never kills the server
                result["error"] = err
                streamer.end()

        stop = threading.Event()
        kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhen(stop)])
        with self._lock:
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            text = ""
            try:
                for piece in streamer:
                    if piece:
                        text += piece
                        yield text.strip()
            finally:  # the page went away mid-answer (generator closed): stop generating before the next one
                stop.set()
                thread.join()
        if "error" in result:
            raise ChatInputError(f"Generation failed: {result['error']}")
        new_ids = result["ids"][0, inputs["input_ids"].shape[1]:]
        yield cm.tokenizer.decode(new_ids, skip_special_tokens=True).strip()

    def answer(self, turns: Sequence[Turn], sampling: Sampling = Sampling()) -> str:
        """The whole answer at once (the stream's last value)."""
        final = ""
        for final in self.stream(turns, sampling):
            pass
        return final
