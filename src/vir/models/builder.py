"""Config section -> model, tokenizer, image processor. The one place that loads weights from disk."""

from __future__ import annotations

import logging
from typing import Optional

from transformers import PreTrainedTokenizerBase

from vir.models.tokenizer import FINETUNE_PAD

logger = logging.getLogger(__name__)

FALLBACK_PAD = "<pad>"


def prepare_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
    image_token: str = "<image>",
    pad_token: Optional[str] = None,
    model_max_length: Optional[int] = None,
) -> PreTrainedTokenizerBase:
    """Make a (Llama-3) tokenizer ready for multimodal training, in place.

    Adds `image_token` as a special token when missing; sets a pad token when there is none (`pad_token`,
    else Llama-3's `<|finetune_right_pad_id|>` when the vocabulary has it, else a new `<pad>`), so padding
    never silently reuses id 0 or the eos id; pads on the right. The caller must resize the model's
    embeddings to `len(tokenizer)` afterwards (`build_model` does).
    """
    vocab = tokenizer.get_vocab()
    if image_token not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
    if pad_token is not None:
        if pad_token not in vocab:
            tokenizer.add_special_tokens({"pad_token": pad_token})
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        if FINETUNE_PAD in vocab:
            tokenizer.pad_token = FINETUNE_PAD
        else:
            tokenizer.add_special_tokens({"pad_token": FALLBACK_PAD})
    tokenizer.padding_side = "right"
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer
