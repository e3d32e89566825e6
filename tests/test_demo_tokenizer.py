from vir.demo.tokenizer import BEGIN_OF_TEXT, EOT, LLAMA3_SPECIAL_TOKENS


def test_special_tokens_follow_the_bpe_vocabulary(tokenizer_dir, tokenizer):
    ids = tokenizer.convert_tokens_to_ids(LLAMA3_SPECIAL_TOKENS)
    assert min(ids) > 255  # byte alphabet first, specials appended as in Llama-3
    assert tokenizer.pad_token == "<|finetune_right_pad_id|>"
    assert tokenizer.pad_token_id != 0 and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<image>") == len(tokenizer) - 1


def test_encoding_adds_begin_of_text_and_round_trips(tokenizer):
    ids = tokenizer("a red circle")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(BEGIN_OF_TEXT)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"


def test_chat_template_is_llama3(tokenizer):
    messages = [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "Red."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
    )
    assert tokenizer.eos_token == EOT


def test_chat_headers_are_single_tokens_as_in_llama3(tokenizer):
    # The corpus never says "user\n\n" or "assistant"; the trainer still learns the template's header text.
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Red."}]
    ids = tokenizer.apply_chat_template(messages)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[:5] == ["<|begin_of_text|>", "<|start_header_id|>", "user", "<|end_header_id|>", "ĊĊ"]
    assert tokens[tokens.index("assistant") - 1 : tokens.index("assistant") + 3] == [
        "<|start_header_id|>", "assistant", "<|end_header_id|>", "ĊĊ"]
