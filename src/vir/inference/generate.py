"""Batched greedy generation for LLaVA models: prompts built by the same templates that built training data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from vir.data.collator import pad_batch
from vir.data.conversation import DEFAULT_IMAGE_TOKEN, Message, tag_images
from vir.data.images import preprocess_images
from vir.data.templates import build_generation_prompt, generation_stop_ids


@dataclass
class Query:
    """One generation request: a conversation ending with a user turn, and its images in tag order."""

    messages: List[Message]
    images: List[Image.Image] = field(default_factory=list)


def question_query(question: str, images: Sequence[Image.Image] = (), image_token: str = DEFAULT_IMAGE_TOKEN) -> Query:
    """A single-turn query; one image tag (`image_token`, the run's `model.image_token`) per image is put in
    front of the question when it has none."""
    return Query([Message("user", tag_images(question, len(images), image_token))], list(images))


def generation_pad_id(tokenizer) -> int:
    """The id prompts are padded with and `generate` is told to pad with: the pad token, else eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists to `[B, T]` for generation; returns (input_ids, attention_mask)."""
    return (pad_batch(sequences, pad_id, side="left"),
            pad_batch([[1] * len(seq) for seq in sequences], 0, side="left"))


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    image_processor,
    queries: Sequence[Query],
    *,
    template: str = "llama3",
    image_aspect_ratio: str = "pad",
    system_prompt: Optional[str] = None,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> List[str]:
    """Greedy answers (decoded, special tokens stripped) for `queries`, in order.

    `model` is a LLaVA model (its config names the image token, its id and count) or, for text-only queries, any
    causal LM (`image_processor` may then be None). Prompts are left-padded with the pad token (eos when the
    tokenizer has none). Generation stops at `generation_stop_ids`: the template's end-of-turn token, the
    tokenizer's eos and the model's `generation_config` eos ids."""
    config = model.config
    image_token = getattr(config, "image_token", None) or DEFAULT_IMAGE_TOKEN
    image_token_id = getattr(config, "image_token_id", None)
    num_image_tokens = getattr(config, "num_image_tokens", None) or 1
    pad_id = generation_pad_id(tokenizer)
    stop_ids = generation_stop_ids(template, tokenizer, getattr(model, "generation_config", None))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: List[str] = []
    batches = range(0, len(queries), batch_size)
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress):
        batch = queries[start : start + batch_size]
        prompts = [
            build_generation_prompt(q.messages, tokenizer, template, image_token_id, num_image_tokens,
                                    system_prompt, image_token)
            for q in batch
        ]
        input_ids, attention_mask = left_pad(prompts, pad_id)
        images = [image for q in batch for image in q.images]
        extra = {}
        if images:
            extra["pixel_values"] = preprocess_images(images, image_processor, image_aspect_ratio).to(device)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            **extra,
        )
        new_tokens = output[:, input_ids.shape[1] :]
        answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    model.train(was_training)
    return answers


def answer_predictor(tokenizer, image_processor, data_cfg, max_new_tokens: int) -> Callable:
    """`predict(model, items) -> answers` for `EvalItem`-like items (`.query`), with the prompt format of
    `data_cfg` (`template`, `image_aspect_ratio`, `system_prompt`): what the sample visualiser calls."""

    def predict(model, items: Sequence) -> List[str]:
        return generate_answers(model, tokenizer, image_processor, [item.query for item in items],
                                template=data_cfg.template, image_aspect_ratio=data_cfg.image_aspect_ratio,
                                system_prompt=data_cfg.system_prompt, max_new_tokens=max_new_tokens)

    return predict
