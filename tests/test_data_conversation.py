"""Conversations: record normalisation, templates (exact masks), image expansion, truncation."""

from __future__ import annotations

import itertools

import pytest
from family_tokenizers import TEMPLATE_FILES

from vir.data.conversation import IGNORE_INDEX, InvalidRecordError, Message, Record, normalize_record, tag_images
from vir.data.templates import (
    SKIP_IMAGES_DO_NOT_FIT,
    SKIP_NO_TRAINED_TOKENS,
    build_example,
    get_template,
    truncate_example,
)

SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat is it?"},
    {"role": "assistant", "content": " A cat. "},
    {"role": "user", "content": "And this <image> one?"},
    {"role": "assistant", "content": "A dog."},
]


@pytest.fixture
def image_token_id(tokenizer):
    return tokenizer.convert_tokens_to_ids("<image>")


def spans(tokenizer, input_ids, labels):
    """Decode runs of equally-trained tokens: [(trained, text), ...] (checks positions exactly)."""
    assert len(input_ids) == len(labels)
    for token_id, label in zip(input_ids, labels):
        assert label in (IGNORE_INDEX, token_id)
    runs = itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX)
    return [(trained, tokenizer.decode([t for t, _ in run])) for trained, run in runs]


# ---- normalize_record --------------------------------------------------------------------------------
def test_llava_record_is_normalised():
    raw = {"id": 7, "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A square."}]}
    record = normalize_record(raw, 0)
    assert record == Record("7", ("a.png",), (Message("user", "<image>\nDescribe."), Message("assistant", "A square.")))


def test_chat_messages_and_missing_id_fall_back_to_the_marked_position():
    raw = {"messages": [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    record = normalize_record(raw, 12)
    assert record.id == "#12" and record.images == ()  # never "12", which a real record may be called
    assert [m.role for m in record.messages] == ["system", "user", "assistant"]


def test_untagged_images_are_prepended_to_first_user_turn():
    raw = {"id": "x", "image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Same."}]}
    record = normalize_record(raw, 0)
    assert record.messages[1].content == "<image>\n<image>\nCompare."
    assert record.num_images == 2


def _conv(*turns):
    return [{"from": role, "value": text} for role, text in turns]


@pytest.mark.parametrize(
    "raw, reason",
    [
        (["not", "a", "dict"], "expected a JSON object, got an array"),
        (None, "expected a JSON object, got null"),
        ({"id": "r"}, "no 'conversations'"),
        ({"id": "r", "conversations": []}, "empty conversation"),
        ({"id": "r", "conversations": _conv(("bot", "x"), ("gpt", "y"))}, "unknown role 'bot'"),
        ({"id": "r", "conversations": _conv(("gpt", "x"), ("human", "y"))}, "first non-system turn"),
        ({"id": "r", "conversations": _conv(("human", "x"), ("human", "y"))}, "do not alternate"),
        ({"id": "r", "conversations": _conv(("human", "x"))}, "no assistant turn"),
        ({"id": "r", "conversations": _conv(("system", "s"))}, "no user turn"),
        ({"id": "r", "conversations": _conv(("human", "x"), ("gpt", "y"), ("system", "s"))}, "system turn"),
        ({"id": "r", "conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "y"}]},
         "content must be a string"),
        ({"id": "r", "conversations": _conv(("human", "  "), ("gpt", "y"))}, "turn 0 (user) is empty"),
        ({"id": "r", "image": 5, "conversations": _conv(("human", "x"), ("gpt", "y"))}, "'image' must be"),
        ({"id": "r", "image": ["a", 1], "conversations": _conv(("human", "x"), ("gpt", "y"))}, "'image' must be"),
        ({"id": "r", "image": "a", "conversations": _conv(("human", "<image><image>x"), ("gpt", "y"))},
         "2 <image> tag(s) but 1 image(s)"),
        ({"id": "r", "conversations": _conv(("human", "<image>x"), ("gpt", "y"))}, "1 <image> tag(s) but 0"),
        ({"id": "r", "image": "a", "conversations": _conv(("human", "x"), ("gpt", "<image>y"))},
         "<image> tag in assistant turn 1"),
    ],
)
def test_invalid_records_are_reported_by_id(raw, reason):
    with pytest.raises(InvalidRecordError) as info:
        normalize_record(raw, 3)
    assert reason in info.value.reason
    assert info.value.record_id == ("r" if isinstance(raw, dict) else "#3")  # no id: named as README says
    assert info.value.record_id in str(info.value)


def test_unknown_template_lists_choices():
    with pytest.raises(ValueError, match=r"data.template.*llama3, plain, vicuna_v1, .*auto"):
        get_template("alpaca")


# ---- llama3 ------------------------------------------------------------------------------------------
# Meta's own chat template, as Meta-Llama-3-8B-Instruct ships it (tests/published_templates/README.md): the
# reference our `llama3` template is compared with, whatever template the fixture tokenizer carries.
META_LLAMA3 = TEMPLATE_FILES["llama3"].read_text()


def meta_ids(tokenizer, messages, **kwargs) -> list:
    return tokenizer.apply_chat_template(messages, chat_template=META_LLAMA3, tokenize=True, **kwargs)["input_ids"]


@pytest.mark.parametrize(
    "messages",
    [
        [SYSTEM, *TWO_TURNS],
        [SYSTEM, {"role": "user", "content": "How many?"}, {"role": "assistant", "content": "Two."},
         {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes.\n"}],
        [{"role": "user", "content": "<image>\n<image>\nSame?"}, {"role": "assistant", "content": "No."}],
    ],
    ids=["images_and_system", "text_only", "two_images_no_system"],
)
def test_llama3_ids_equal_metas_published_chat_template(tokenizer, image_token_id, messages):
    input_ids, _ = build_example(messages, tokenizer, "llama3", image_token_id, num_image_tokens=1)
    assert input_ids == meta_ids(tokenizer, messages)


def test_llama3_system_prompt_is_used_only_without_a_system_turn(tokenizer, image_token_id):
    with_prompt, _ = build_example(TWO_TURNS, tokenizer, "llama3", image_token_id, 1, system_prompt="Be brief.")
    assert with_prompt == meta_ids(tokenizer, [SYSTEM, *TWO_TURNS])
    own_system = [{"role": "system", "content": "Own."}, *TWO_TURNS]
    ids, _ = build_example(own_system, tokenizer, "llama3", image_token_id, 1, system_prompt="Be brief.")
    assert ids == meta_ids(tokenizer, own_system)


def test_llama3_labels_train_only_assistant_content_and_eot(tokenizer, image_token_id):
    input_ids, labels = build_example([SYSTEM, *TWO_TURNS], tokenizer, "llama3", image_token_id, num_image_tokens=3)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert spans(tokenizer, input_ids, labels) == [
        (False, "<|begin_of_text|>" + header.format("system") + "Be brief.<|eot_id|>"
         + header.format("user") + "<image>" * 3 + "\nWhat is it?<|eot_id|>" + header.format("assistant")),
        (True, "A cat.<|eot_id|>"),
        (False, header.format("user") + "And this " + "<image>" * 3 + " one?<|eot_id|>" + header.format("assistant")),
        (True, "A dog.<|eot_id|>"),
    ]


def test_image_expansion_counts(tokenizer, image_token_id):
    record = normalize_record({"id": "m", "image": ["a", "b"], "conversations": _conv(("human", "Q"), ("gpt", "A"))}, 0)
    input_ids, labels = build_example(record, tokenizer, "llama3", image_token_id, num_image_tokens=5)
    positions = [k for k, t in enumerate(input_ids) if t == image_token_id]
    assert len(positions) == 10
    # two contiguous blocks of 5, both masked
    assert positions[4] - positions[0] == 4 and positions[9] - positions[5] == 4
    assert all(labels[k] == IGNORE_INDEX for k in positions)


# ---- plain -------------------------------------------------------------------------------------------
def test_plain_trains_caption_and_eos_only(tokenizer, image_token_id):
    messages = [{"role": "user", "content": "<image>\n<image>\nignored text"},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": "No."}]
    input_ids, labels = build_example(messages, tokenizer, "plain", image_token_id, num_image_tokens=4,
                                      system_prompt="unused")
    assert spans(tokenizer, input_ids, labels) == [
        (False, "<|begin_of_text|>" + "<image>" * 8),
        (True, "A cat.<|eot_id|>"),
    ]
    assert input_ids[-1] == tokenizer.eos_token_id


# ---- truncation --------------------------------------------------------------------------------------
IMG = 99


def test_truncate_keeps_fitting_samples_untouched():
    result = truncate_example([1, IMG, IMG, 5, 6], [-100, -100, -100, 5, 6], 5, IMG, 2)
    assert (result.input_ids, result.truncated, result.skip_reason) == ([1, IMG, IMG, 5, 6], False, None)


def test_truncate_cuts_text_after_the_images():
    result = truncate_example([1, IMG, IMG, 4, 5, 6], [-100, -100, -100, 4, 5, 6], 4, IMG, 2)
    assert (result.input_ids, result.labels, result.truncated, result.skip_reason) == (
        [1, IMG, IMG, 4], [-100, -100, -100, 4], True, None)


@pytest.mark.parametrize("max_length, reason", [(2, SKIP_IMAGES_DO_NOT_FIT), (3, SKIP_NO_TRAINED_TOKENS)])
def test_truncate_skips_what_cannot_train(max_length, reason):
    ids = [1, IMG, IMG, 4, 5]
    result = truncate_example(ids, [-100, -100, -100, 4, 5], max_length, IMG, 2)
    assert result.skip_reason == reason and result.input_ids == ids  # uncut, for inspection


def test_truncation_never_splits_or_drops_an_image_block():
    ids = [1, 2, IMG, IMG, IMG, 3, 4, IMG, IMG, IMG, 5, 6, 7]
    labels = [-100 if t in (1, IMG) else t for t in ids]
    for max_length in range(1, len(ids) + 2):
        result = truncate_example(ids, labels, max_length, IMG, 3)
        if result.skip_reason is None:
            assert len(result.input_ids) <= max_length
            assert result.input_ids.count(IMG) == 6  # every image kept whole
            assert any(label != IGNORE_INDEX for label in result.labels)
        else:
            assert max_length < 11  # the last image block ends at index 9; 5 is the first trained token after


def test_generation_prompt_equals_chat_template_with_generation_prompt(tokenizer):
    from vir.data.templates import build_generation_prompt

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat colour is the circle?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the square?"},
    ]
    ids = build_generation_prompt(messages, tokenizer, "llama3", image_token_id, num_image_tokens=1)
    expected = meta_ids(tokenizer, messages, add_generation_prompt=True)
    assert ids == expected


def test_generation_prompt_plain_is_bos_and_image_blocks(tokenizer):
    from vir.data.templates import build_generation_prompt

    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = build_generation_prompt([{"role": "user", "content": "<image>"}], tokenizer, "plain", image_token_id, 3)
    assert ids == [tokenizer.bos_token_id] + [image_token_id] * 3


def test_tag_images_puts_one_tag_per_image_in_front_unless_the_text_has_tags():
    assert tag_images("Same?", 2) == "<image>\n<image>\nSame?"
    assert tag_images("Left <image> right", 1) == "Left <image> right"  # the writer placed it
    assert tag_images("No image.", 0) == "No image."
    assert tag_images("Q", 1, "<img>") == "<img>\nQ"
