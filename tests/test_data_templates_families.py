"""Chat templates per model family, checked against each family's *published* Jinja template
(`tests/published_templates/`) on a tiny tokenizer of that family (`tests/family_tokenizers.py`)."""

from __future__ import annotations

import copy
import itertools

import pytest
from transformers import GenerationConfig

from family_tokenizers import FAMILIES, FAMILY_TEMPLATES, IMAGE_TOKEN, TEMPLATE_FILES, family_tokenizer
from vir.data.conversation import IGNORE_INDEX
from vir.data.templates import (
    LLAMA3_CHAT_TEMPLATE,
    build_example,
    build_generation_prompt,
    check_template,
    generation_stop_ids,
)
from vir.data.templates_auto import as_parts
from vir.data.templates_text import VICUNA_V1_SYSTEM, TemplateError
from vir.export.chat_template import chat_template_for
from vir.export.chat_template import drop_implicit_bos

USER, ASSISTANT = "user", "assistant"
RECORDS = {
    "image": [{"role": USER, "content": "<image>\nWhat is it?"}, {"role": ASSISTANT, "content": "A cat."}],
    "text": [{"role": USER, "content": "Say hi."}, {"role": ASSISTANT, "content": "Hi there."}],
    "multi_turn": [{"role": USER, "content": "<image>\nWhat is it?"}, {"role": ASSISTANT, "content": "A cat."},
                   {"role": USER, "content": "What colour is it?"}, {"role": ASSISTANT, "content": "It is black."}],
    "multi_image": [{"role": USER, "content": "<image>\n<image>\nCompare them."},
                    {"role": ASSISTANT, "content": "They match."}],
}
# The token that closes an assistant turn in each family's published template (llava-hf's LLaVA-1.5 template
# writes none: a space).
END_TOKENS = {"llama3": "<|eot_id|>", "vicuna": None, "mistral": "</s>", "qwen2": "<|im_end|>",
              "gemma": "<end_of_turn>", "phi3": "<|end|>"}
NAMED_END_TOKENS = {"llama3": "<|eot_id|>", "vicuna": "</s>", "mistral": "</s>", "qwen2": "<|im_end|>",
                    "gemma": "<end_of_turn>"}
NAMED = [f for f in FAMILIES if FAMILY_TEMPLATES[f] != "auto"]
# Families whose named template renders exactly what the published template renders.
SAME_AS_PUBLISHED = [f for f in NAMED if f != "vicuna"]


def image_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def published(family: str, messages: list[dict]) -> list[dict]:
    """`messages` as the published template takes them (llava-hf's reads typed content parts)."""
    if family == "vicuna":
        return [{"role": m["role"], "content": as_parts(m["content"], IMAGE_TOKEN)} for m in messages]
    return messages


def published_ids(family: str, messages: list[dict], generation: bool = False) -> list[int]:
    tokenizer = family_tokenizer(family)
    return tokenizer.apply_chat_template(published(family, messages), tokenize=True,
                                         add_generation_prompt=generation)["input_ids"]


def vicuna_published_ids(messages: list[dict], generation: bool = False) -> list[int]:
    """llava-hf's LLaVA-1.5 template with LLaVA's system prompt as an explicit system turn, each reply's closing
    " " replaced by LLaVA's "</s>", tokenized with bos as LlavaProcessor does: LLaVA's `conv_vicuna_v1`."""
    tokenizer = family_tokenizer("vicuna")
    text = tokenizer.apply_chat_template(published("vicuna", [{"role": "system", "content": VICUNA_V1_SYSTEM},
                                                              *messages]),
                                         tokenize=False, add_generation_prompt=generation)
    for message in messages:
        if message["role"] == ASSISTANT:
            text = text.replace(f"ASSISTANT: {message['content']} ", f"ASSISTANT: {message['content']}</s>")
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def trained_runs(input_ids, labels) -> list[list[int]]:
    assert len(input_ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
    runs = itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    return [[token for token, _ in run] for trained, run in runs if trained]


def assert_assistant_only(family: str, messages, input_ids, labels, end_token) -> None:
    """Exactly each reply (and its end-of-turn token) is trained; no header, system, user or image token."""
    tokenizer = family_tokenizer(family)
    answers = [m["content"] for m in messages if m["role"] == ASSISTANT]
    runs = trained_runs(input_ids, labels)
    assert len(runs) == len(answers)
    end_id = tokenizer.convert_tokens_to_ids(end_token) if end_token else None
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    for run, answer in zip(runs, answers):
        if end_id is not None:
            assert run[-1] == end_id
            run = run[:-1]
        assert not special & set(run)
        assert tokenizer.decode(run).strip() == answer


def collapse_images(input_ids, labels, token_id, count):
    """Each run of `count` image ids as one id (checks the runs are whole and masked)."""
    ids, out_labels, k = [], [], 0
    while k < len(input_ids):
        if input_ids[k] == token_id:
            assert input_ids[k: k + count] == [token_id] * count
            assert labels[k: k + count] == [IGNORE_INDEX] * count
            ids.append(token_id)
            out_labels.append(IGNORE_INDEX)
            k += count
        else:
            ids.append(input_ids[k])
            out_labels.append(labels[k])
            k += 1
    return ids, out_labels


def build(family, messages, template, num_image_tokens=1, system_prompt=None):
    tokenizer = family_tokenizer(family)
    return build_example(messages, tokenizer, template, image_id(tokenizer), num_image_tokens, system_prompt)


def prompt(family, messages, template, system_prompt=None):
    tokenizer = family_tokenizer(family)
    return build_generation_prompt(messages, tokenizer, template, image_id(tokenizer), 1, system_prompt)


def test_published_llama3_template_is_the_one_we_ship():
    assert TEMPLATE_FILES["llama3"].read_text() == LLAMA3_CHAT_TEMPLATE


# ---- named templates ---------------------------------------------------------------------------------
@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("family", NAMED)
def test_named_template_ids_equal_published_template(family, record):
    messages = RECORDS[record]
    input_ids, labels = build(family, messages, FAMILY_TEMPLATES[family])
    expected = vicuna_published_ids(messages) if family == "vicuna" else published_ids(family, messages)
    assert input_ids == expected
    assert_assistant_only(family, messages, input_ids, labels, NAMED_END_TOKENS[family])


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("family", NAMED)
def test_named_generation_prompt_equals_published_generation_prompt(family, record):
    messages = RECORDS[record][:-1]
    ids = prompt(family, messages, FAMILY_TEMPLATES[family])
    expected = (vicuna_published_ids(messages, generation=True) if family == "vicuna"
                else published_ids(family, messages, generation=True))
    assert ids == expected


@pytest.mark.parametrize("family", [*NAMED, "phi3"])
@pytest.mark.parametrize("record", ["image", "multi_turn", "multi_image"])
def test_each_image_tag_expands_to_masked_image_ids(family, record):
    template = FAMILY_TEMPLATES[family]
    messages = RECORDS[record]
    tokenizer = family_tokenizer(family)
    one = build(family, messages, template)
    four = build(family, messages, template, num_image_tokens=4)
    tags = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    assert four[0].count(image_id(tokenizer)) == 4 * tags
    assert collapse_images(*four, image_id(tokenizer), 4) == one


def test_vicuna_v1_is_llava_conv_vicuna_v1_text():
    tokenizer = family_tokenizer("vicuna")
    ids, _ = build("vicuna", RECORDS["multi_turn"], "vicuna_v1")
    assert tokenizer.decode(ids) == (
        f"<s> {VICUNA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT: A cat.</s>"
        "USER: What colour is it? ASSISTANT: It is black.</s>")


def test_system_prompt_replaces_the_default_system_text():
    messages = RECORDS["image"]
    ids, _ = build("qwen2", messages, "chatml", system_prompt="Be brief.")
    assert ids == published_ids("qwen2", [{"role": "system", "content": "Be brief."}, *messages])
    ids, _ = build("mistral", messages, "mistral_instruct", system_prompt="Be brief.")
    assert ids == published_ids("mistral", [{"role": "system", "content": "Be brief."}, *messages])
    own = [{"role": "system", "content": "Own."}, *messages]  # the conversation's own system turn wins
    assert build("qwen2", own, "chatml", system_prompt="Be brief.")[0] == published_ids("qwen2", own)


def test_gemma_puts_the_system_text_before_the_first_question():
    tokenizer = family_tokenizer("gemma")
    messages = [{"role": "system", "content": "Be brief."}, *RECORDS["text"]]
    ids, labels = build("gemma", messages, "gemma")
    folded = [{"role": USER, "content": "Be brief.\n\nSay hi."}, RECORDS["text"][1]]
    assert ids == published_ids("gemma", folded)
    assert_assistant_only("gemma", messages, ids, labels, "<end_of_turn>")
    with pytest.raises(Exception, match="System role not supported"):  # what the published template does
        tokenizer.apply_chat_template(messages, tokenize=False)


# ---- auto --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_auto_ids_equal_published_template_and_train_replies_only(family, record):
    messages = RECORDS[record]
    input_ids, labels = build(family, messages, "auto")
    assert input_ids == published_ids(family, messages)
    assert_assistant_only(family, messages, input_ids, labels, END_TOKENS[family])
    assert prompt(family, messages[:-1], "auto") == published_ids(family, messages[:-1], generation=True)


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("family", SAME_AS_PUBLISHED)
def test_auto_equals_the_named_template_where_they_render_alike(family, record):
    messages = RECORDS[record]
    assert build(family, messages, "auto", num_image_tokens=3) == build(
        family, messages, FAMILY_TEMPLATES[family], num_image_tokens=3)


def test_auto_does_not_train_phi3s_closing_eos():
    tokenizer = family_tokenizer("phi3")
    ids, labels = build("phi3", RECORDS["text"], "auto")
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == IGNORE_INDEX


# ---- errors -------------------------------------------------------------------------------------------
def test_missing_special_token_names_template_token_and_what_fits():
    with pytest.raises(TemplateError) as info:
        check_template("chatml", family_tokenizer("llama3"))
    message = str(info.value)
    assert "\n" not in message
    assert "data.template=chatml" in message and "'<|im_start|>'" in message
    assert "data.template=auto" in message and "data.template=llama3" in message
    with pytest.raises(TemplateError, match=r"data.template=gemma: .*'<bos>'.*auto.*vicuna_v1.*mistral_instruct"):
        build("vicuna", RECORDS["text"], "gemma")


def test_auto_without_a_chat_template_is_one_line(tmp_path):
    tokenizer = family_tokenizer("qwen2", tmp_path)
    tokenizer.chat_template = None
    with pytest.raises(TemplateError) as info:
        check_template("auto", tokenizer)
    assert "\n" not in str(info.value)
    assert "data.template=auto" in str(info.value) and "llama3, plain, vicuna_v1" in str(info.value)
    with pytest.raises(TemplateError, match="no chat template"):
        build_example(RECORDS["text"], tokenizer, "auto", image_id(tokenizer), 1)


def test_plain_works_without_a_bos_token():
    tokenizer = family_tokenizer("qwen2")
    ids, labels = build("qwen2", RECORDS["image"], "plain", num_image_tokens=2)
    reply = tokenizer("A cat.", add_special_tokens=False)["input_ids"]
    assert ids == [image_id(tokenizer)] * 2 + reply + [tokenizer.eos_token_id]
    assert labels == [IGNORE_INDEX] * 2 + reply + [tokenizer.eos_token_id]


# ---- stop ids -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_stop_ids(family):
    tokenizer = family_tokenizer(family)
    template = FAMILY_TEMPLATES[family]
    end = NAMED_END_TOKENS.get(family) or END_TOKENS[family]
    expected = list(dict.fromkeys([tokenizer.convert_tokens_to_ids(end), tokenizer.eos_token_id]))
    assert generation_stop_ids(template, tokenizer) == expected
    config = GenerationConfig(eos_token_id=[expected[0], 5, 7])
    assert generation_stop_ids(template, tokenizer, config) == [*expected, 5, 7]
    assert generation_stop_ids(template, tokenizer, GenerationConfig(eos_token_id=9)) == [*expected, 9]
    if family != "vicuna":  # llava-hf's template ends a reply with a space: only eos stops it
        assert generation_stop_ids("auto", tokenizer) == expected


# ---- export ----------------------------------------------------------------------------------------------
def processor_ids(tokenizer, chat, chat_template) -> list[int]:
    """What an exported processor's `apply_chat_template(tokenize=True)` gives: the rendered text tokenized with
    the tokenizer's special tokens unless it already starts with bos (transformers' ProcessorMixin)."""
    text = tokenizer.apply_chat_template(chat, chat_template=chat_template, add_generation_prompt=True,
                                         tokenize=False)
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


@pytest.mark.parametrize("template", ["named", "auto", "plain"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exported_chat_template_renders_the_generation_prompt(family, template):
    tokenizer = family_tokenizer(family)
    name = FAMILY_TEMPLATES[family] if template == "named" else template
    if name == "auto" and family in ("vicuna", "phi3"):
        # llava-hf's and Phi-3's own templates write no bos, which the tokenizer adds: the export stops it adding one
        # training's prompts lack (`drop_implicit_bos`).
        tokenizer = copy.deepcopy(tokenizer)
        drop_implicit_bos(tokenizer, name, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), 1)
    system = None if name in ("plain", "auto") and family == "gemma" else "Be brief."
    jinja = chat_template_for(name, tokenizer, system, IMAGE_TOKEN)
    records = ["image", "multi_image"] if name == "plain" else ["multi_turn", "multi_image"]
    for messages in (RECORDS[record][:-1] for record in records):
        expected = prompt(family, messages, name, system)
        chats = [messages, published("vicuna", messages)]  # string content and typed parts
        if name == "auto" and family == "vicuna":
            chats = chats[1:]  # llava-hf's own template reads typed parts only, as its processor gives them
        for chat in chats:
            assert processor_ids(tokenizer, chat, jinja) == expected
