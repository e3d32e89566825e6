"""Tiny tokenizers, one per LLaVA-family LLM, trained here in about a second each with the `tokenizers` library.

Each has its family's special tokens (bos / eos / unk / pad as the family has them), its family's kind of
pre-tokenization (byte-level BPE for Llama-3 and Qwen2; SentencePiece-like "▁" BPE for Llama-2 / Vicuna,
Mistral, Phi-3 and Gemma, with Llama-2's prefix space where the family adds one), `<image>` as a special token,
and its family's *published* chat template (`tests/published_templates/*.jinja`, sources in the README there) as
`tokenizer.chat_template`. No hub download: tests and tiny per-family checkpoints use these.

    family_tokenizer("qwen2")            # cached per process; do not mutate it, or pass `directory`
    family_tokenizer("gemma", tmp_path)  # a fresh copy, saved there with save_pretrained
    FAMILY_TEMPLATES["gemma"]            # -> "gemma", the named `data.template` for that family
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Optional

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers import trainers
from transformers import PreTrainedTokenizerFast

from vir.data.templates import LLAMA3_SPECIAL_TOKENS

PUBLISHED_TEMPLATES = Path(__file__).parent / "published_templates"
IMAGE_TOKEN = "<image>"
FAMILIES = ("llama3", "vicuna", "mistral", "qwen2", "gemma", "phi3")
# family -> the named `data.template` a LLaVA checkpoint of that family was trained with (phi3 has none here).
FAMILY_TEMPLATES = {"llama3": "llama3", "vicuna": "vicuna_v1", "mistral": "mistral_instruct", "qwen2": "chatml",
                    "gemma": "gemma", "phi3": "auto"}
# family -> its published template's file (vicuna: llava-hf/llava-1.5-7b-hf's; see the README there).
TEMPLATE_FILES = {family: PUBLISHED_TEMPLATES / f"{family}.jinja" for family in FAMILIES}

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_WORDS = ("a cat dog red blue green square circle triangle left right above below what is it the this that "
          "colour color shape how many are there one two three four yes no compare them they match differ "
          "say hi hello there be brief you an assistant user system question answer image picture black white "
          "small large big it's I am fine thank chat between curious artificial intelligence helpful").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """`n` synthetic sentences (deterministic): word salad plus the punctuation and role words chats hold."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":"]))
    printable = "".join(chr(c) for c in range(32, 127))  # every ASCII character is in the alphabet
    return lines + ["USER: ASSISTANT: [INST] [/INST] user model assistant system\n\n"] * 20 + [printable]


def _bpe(pre_tokenizer, decoder, specials: list[str], vocab_size: int, unk: Optional[str] = None,
         byte_level: bool = False, normalizer=None) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=unk) if unk else models.BPE())
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else sorted(set("".join(corpus())) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials if unk else [],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def _wrap(tok: Tokenizer, chat_template: str, **special) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False,
                                 model_input_names=["input_ids", "attention_mask"], **special)
    hf.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    hf.chat_template = chat_template
    return hf


def _llama3() -> PreTrainedTokenizerFast:
    tok = _bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
               decoders.ByteLevel(), [], 512, byte_level=True)
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))]),
    ])
    return _wrap(tok, TEMPLATE_FILES["llama3"].read_text(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _sentencepiece_like(prepend: str, specials: list[str], bos: str) -> Tokenizer:
    """Llama-2 style: "▁" for spaces (prepended to the first word when `prepend` is "first"), BPE, bos added."""
    tok = _bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=True),
               decoders.Metaspace(replacement="▁", prepend_scheme=prepend, split=False), specials, 512,
               unk="<unk>")
    # Trained on words (pieces start with "▁", as SentencePiece's do), applied to the whole text as Llama-2's
    # and Gemma's tokenizer.json do.
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _llama2_family(family: str) -> PreTrainedTokenizerFast:
    tok = _sentencepiece_like("first", ["<unk>", "<s>", "</s>"], "<s>")
    return _wrap(tok, TEMPLATE_FILES[family].read_text(), bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _qwen2() -> PreTrainedTokenizerFast:
    tok = _bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), "isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
               decoders.ByteLevel(), [], 512, byte_level=True)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Qwen2.5-Instruct's tokenizer_config: no bos, eos <|im_end|>, pad <|endoftext|>.
    return _wrap(tok, TEMPLATE_FILES["qwen2"].read_text(), eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _gemma() -> PreTrainedTokenizerFast:
    # Gemma: <pad>=0 <eos>=1 <bos>=2 <unk>=3, spaces as "▁" with no prefix space, bos added.
    tok = _sentencepiece_like("never", ["<pad>", "<eos>", "<bos>", "<unk>"], "<bos>")
    tok.add_special_tokens(["<start_of_turn>", "<end_of_turn>"])
    return _wrap(tok, TEMPLATE_FILES["gemma"].read_text(), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                 unk_token="<unk>")


def _phi3() -> PreTrainedTokenizerFast:
    tok = _sentencepiece_like("first", ["<unk>", "<s>", "</s>"], "<s>")
    # Phi-3-mini's added tokens: <|endoftext|> (eos, pad), then the chat tokens, which strip the whitespace after
    # them (rstrip), as in its tokenizer.json.
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)]
                           + [AddedToken(t, special=True, rstrip=True)
                              for t in ("<|assistant|>", "<|system|>", "<|end|>", "<|user|>")])
    return _wrap(tok, TEMPLATE_FILES["phi3"].read_text(), bos_token="<s>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", unk_token="<unk>")


_BUILDERS = {"llama3": _llama3, "vicuna": lambda: _llama2_family("vicuna"),
             "mistral": lambda: _llama2_family("mistral"), "qwen2": _qwen2, "gemma": _gemma, "phi3": _phi3}


@functools.lru_cache(maxsize=None)
def _cached(family: str) -> PreTrainedTokenizerFast:
    return _BUILDERS[family]()


def family_tokenizer(family: str, directory: Optional[Path] = None) -> PreTrainedTokenizerFast:
    """The tiny tokenizer of `family` (one of `FAMILIES`). Without `directory`: one shared instance per process
    (do not modify it). With `directory`: a fresh copy saved there (`save_pretrained`) and loaded back."""
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choices: {', '.join(FAMILIES)}")
    if directory is None:
        return _cached(family)
    _cached(family).save_pretrained(str(directory))
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def all_family_tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {family: family_tokenizer(family) for family in FAMILIES}


__all__ = ["FAMILIES", "FAMILY_TEMPLATES", "IMAGE_TOKEN", "TEMPLATE_FILES", "all_family_tokenizers", "corpus",
           "family_tokenizer"]
