"""Batched greedy generation: left-padded batches equal one-by-one generation and a plain greedy loop."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from training_fixtures import run_config, tiny_bases

from vir.data.conversation import Message
from vir.data.images import preprocess_images
from vir.data.templates import build_generation_prompt
from vir.inference.evaluate import load_eval_items
from vir.inference.generate import Query, generate_answers, left_pad, question_query
from vir.models.builder import build_all

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """A tiny model on the tiny bases with a random projector (eval mode), its tokenizer and processor."""
    bases = tiny_bases(tmp_path_factory)
    cfg = run_config(bases, tmp_path_factory.mktemp("unused"), "stage2_full")
    torch.manual_seed(0)
    model, tokenizer, processor = build_all(cfg)
    return model.eval(), tokenizer, processor, bases


@pytest.fixture(scope="session")
def queries(setup):
    """Prompts of different lengths: with one image, text only, two images in one query, multi-turn."""
    _, _, _, bases = setup
    items = load_eval_items(bases.data.eval, bases.data.root)
    scene_a, scene_b = items[0].query.images[0], items[1].query.images[0]
    wide = Image.new("RGB", (48, 20), (200, 30, 30))  # not square: padded to a square by the processor
    return [
        items[0].query,
        question_query("How many objects are there in the picture, counting every shape?"),
        question_query("Are the two pictures the same?", [scene_a, scene_b]),
        Query([Message("user", "<image>\nWhat colour is it?"), Message("assistant", "red"),
               Message("user", "And its shape?")], [wide]),
        question_query("Hi"),
        items[1].query,
    ]


def _greedy_reference(model, tokenizer, processor, query: Query) -> str:
    """The slow, obvious way: the template's generation prompt, then argmax over the full sequence each step."""
    config = model.config
    ids = build_generation_prompt(query.messages, tokenizer, "llama3", config.image_token_id,
                                  config.num_image_tokens)
    pixel_values = preprocess_images(query.images, processor, "pad") if query.images else None
    generated = []
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            logits = model(input_ids=torch.tensor([ids + generated]), pixel_values=pixel_values).logits
            token = int(logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            generated.append(token)
    return tokenizer.decode(generated, skip_special_tokens=True).strip()


def test_batched_generation_equals_generating_each_query_alone(setup, queries):
    model, tokenizer, processor, _ = setup
    batched = generate_answers(model, tokenizer, processor, queries, max_new_tokens=MAX_NEW_TOKENS, batch_size=8)
    alone = [generate_answers(model, tokenizer, processor, [q], max_new_tokens=MAX_NEW_TOKENS)[0] for q in queries]
    assert batched == alone
    assert sum(bool(a) for a in batched) >= 4  # a random model still says something: not a trivial match
    in_pairs = generate_answers(model, tokenizer, processor, queries, max_new_tokens=MAX_NEW_TOKENS, batch_size=4)
    assert in_pairs == batched  # batches of different composition (and a short last batch) agree too


def test_generation_follows_the_training_template_prompt(setup, queries):
    model, tokenizer, processor, _ = setup
    answers = generate_answers(model, tokenizer, processor, queries, max_new_tokens=MAX_NEW_TOKENS)
    assert answers == [_greedy_reference(model, tokenizer, processor, q) for q in queries]


def test_generation_restores_training_mode(setup, queries):
    model, tokenizer, processor, _ = setup
    model.train()
    try:
        generate_answers(model, tokenizer, processor, queries[:1], max_new_tokens=1)
        assert model.training
    finally:
        model.eval()


def test_the_images_matter(setup, queries):
    model, tokenizer, processor, _ = setup
    query = queries[0]
    black = Query(query.messages, [Image.new("RGB", query.images[0].size)])
    with torch.no_grad():
        ids = build_generation_prompt(query.messages, tokenizer, "llama3", model.config.image_token_id,
                                      model.config.num_image_tokens)
        logits = [model(input_ids=torch.tensor([ids]), pixel_values=preprocess_images(q.images, processor, "pad"))
                  .logits[0, -1] for q in (query, black)]
    assert not torch.allclose(*logits)


def test_question_query_puts_one_tag_per_image():
    images = [Image.new("RGB", (8, 8))] * 2
    assert question_query("Same?", images).messages == [Message("user", "<image>\n<image>\nSame?")]
    assert question_query("<image> Left one?", images[:1]).messages == [Message("user", "<image> Left one?")]
    assert question_query("Hi").images == []


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
