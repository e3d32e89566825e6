"""Shared fixtures: a locally trained Llama-3-style tokenizer (no downloads)."""

from __future__ import annotations

import pytest

from vir.demo.tokenizer import train_llama3_style_tokenizer
from vir.models.builder import prepare_tokenizer

CORPUS = [
    "The red square is left of the blue circle.",
    "How many green objects are there? There are two green objects.",
    "A small yellow triangle sits in the top row, right of a large purple star.",
    "Describe the image. Is there a cyan cross? Yes. No. What colour is the circle?",
    "You are a helpful assistant. Answer briefly and precisely.",
    "What is in the picture? A photo of a cat sitting on a mat next to a dog.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A saved HF tokenizer directory with Llama-3 special tokens and chat template (no pad/<image> yet)."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_llama3_style_tokenizer(CORPUS * 20, out, vocab_size=512)
    return out


@pytest.fixture
def tokenizer(tokenizer_dir):
    """The fixture tokenizer prepared for multimodal training (`<image>` and pad added)."""
    from transformers import AutoTokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir)), image_token="<image>")
