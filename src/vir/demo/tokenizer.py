"""A small byte-level BPE tokenizer with Llama-3's special tokens and chat template, trained locally.

Tests and the embedded default cannot download Llama-3's tokenizer, so they train one of these on their own
text with the `tokenizers` library. It behaves like Llama-3's where the pipeline cares: the same pre-split
regex, byte-level BPE, `<|begin_of_text|>` added in front of every encoded text, the header/eot special
tokens (appended after the BPE vocabulary, as in Llama-3, so id 0 is an ordinary byte token) and the
official chat template. Like Llama-3's, it encodes the template's header text (`user`, `assistant`, `system`,
the `\n\n` after `<|end_header_id|>`) as one token each: the trainer also reads the header text the template
puts around each text's turns, so a header costs 4 tokens, not 7 (user) or 10 (assistant: `a`, `ss`, `i`, `st`,
`an`, `t`, then two `\n`). It is saved as a normal HF tokenizer directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vir.data.templates import BEGIN_OF_TEXT, EOT, LLAMA3_CHAT_TEMPLATE, LLAMA3_SPECIAL_TOKENS

# Llama-3's pre-tokenizer split pattern (tiktoken cl100k-style).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _with_header_text(texts: Iterable[str]) -> Iterator[str]:
    """`texts`, each followed by the header text the chat template writes around its turns (a conversation's
    turns are its lines): a user and an assistant header per question/answer pair and a system header, so
    the BPE merges see the role names and the blank line as often as rendered conversations hold them."""
    for text in texts:
        yield text
        turns = text.count("\n") + 1
        yield "system\n\n" + "user\n\nassistant\n\n" * ((turns + 1) // 2)


def train_llama3_style_tokenizer(
    texts: Iterable[str], out_dir: str | Path | None = None, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a Llama-3-like HF tokenizer.

    The returned tokenizer has no pad token and no `<image>` token: `vir.models.builder.prepare_tokenizer`
    adds those, exactly as it does for a real Llama-3 tokenizer. When `out_dir` is given the tokenizer is
    saved there with `save_pretrained`.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(LLAMA3_SPECIAL_TOKENS), 256 + 1),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_with_header_text(texts), trainer=trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
    bos_id = tok.token_to_id(BEGIN_OF_TEXT)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BEGIN_OF_TEXT} $A",
                pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
                special_tokens=[(BEGIN_OF_TEXT, bos_id)],
            ),
        ]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BEGIN_OF_TEXT,
        eos_token=EOT,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    hf_tok.chat_template = LLAMA3_CHAT_TEMPLATE
    if out_dir is not None:
        hf_tok.save_pretrained(str(out_dir))
    return hf_tok
