"""Base-model recipes: the from-scratch CLIP tower and Llama load as HF directories, learn, and are reused."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel, LlamaForCausalLM

from vir.data.conversation import IGNORE_INDEX
from vir.data.images import preprocess_images
from vir.data.templates import build_example
from vir.demo import llm_base, vision_base
from vir.demo.bases import base_qa_spec, build_bases
from vir.demo.common import PRETRAIN_METRICS_FILE, BaseMismatchError, pretrain_arguments
from vir.demo.config import LLMPretrainConfig, VisionPretrainConfig
from vir.demo.llm_base import (
    DocumentDataset,
    LabelledLoss,
    _BaseTrainer,
    build_llama,
    collate,
    encode_document,
    init_from_words,
    labelled_tokens_per_document,
    pretrain_llm,
)
from vir.demo.scene_text import (
    GRID_EMPTY,
    SceneCaption,
    grid_token,
    grid_token_words,
    grid_tokens,
    scene_caption_examples,
    scene_description,
    scene_grid,
    scene_qa_examples,
    to_messages,
)
from vir.demo.synthetic import SyntheticConfig, corpus_texts, labelled_scene, sample_scene
from vir.demo.vision_base import DENSE_HEADS, dense_labels, pretrain_vision_tower, render_bank
from vir.models.image_processors import clip_image_processor
from vir.utils.config import compose_config
from vir.utils.config_schema import LLMConfig, VisionTowerConfig

SPEC = SyntheticConfig(num_stage1=40, num_train=80, num_eval=10, num_test=10, vocab_size=400)
TOWER = VisionTowerConfig(image_size=64, patch_size=16, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, select_layer=-1)
VISION = VisionPretrainConfig(max_steps=40, batch_size=32, learning_rate=3e-3, bank_size=256, eval_size=64,
                              eval_every=20)
LLM = LLMConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
LLM_PRETRAIN = LLMPretrainConfig(max_steps=30, batch_size=8, learning_rate=1e-2, eval_size=8, eval_every=15,
                                 num_scene_qa=40)


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    pretrain_vision_tower(out, SPEC, TOWER, VISION)
    return out


@pytest.fixture(scope="module")
def synthetic_tokenizer_dir(tmp_path_factory):
    from vir.demo.tokenizer import train_llama3_style_tokenizer

    out = tmp_path_factory.mktemp("synthetic_tokenizer")
    train_llama3_style_tokenizer(corpus_texts(SPEC), out, vocab_size=SPEC.vocab_size)
    return out


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, synthetic_tokenizer_dir):
    out = tmp_path_factory.mktemp("llm")
    documents = corpus_texts(SPEC) + [e["messages"] for e in scene_qa_examples(SPEC, 40, seed=0, stream=0)]
    pretrain_llm(out, synthetic_tokenizer_dir, documents, LLM, LLM_PRETRAIN,
                 eval_examples=scene_qa_examples(SPEC, 8, seed=0, stream=1))
    return out


def _metrics(directory):
    return json.loads((directory / PRETRAIN_METRICS_FILE).read_text())


# --- vision tower -------------------------------------------------------------------------------------------


def test_dense_labels_append_row_and_column():
    rng = np.random.default_rng(0)
    _, cells = labelled_scene(rng, SPEC)
    labels = dense_labels(cells, SPEC.grid)
    assert labels.shape == (16, 6)
    assert labels[:, :4].tolist() == cells.tolist()
    assert labels[6, 4:].tolist() == [1, 2]  # cell 6 of a 4x4 grid: row 1, column 2 (0-based)


def test_bank_is_preprocessed_exactly_as_training():
    processor = clip_image_processor(64)
    pixels, labels = render_bank(SPEC, processor, 3, seed=5, stream=0)
    rng = np.random.default_rng([5, SPEC.seed, 0])
    images = [labelled_scene(rng, SPEC)[0] for _ in range(3)]
    assert torch.equal(pixels, preprocess_images(images, processor, "pad"))
    assert pixels.shape == (3, 3, 64, 64) and labels.shape == (3, 16, 6)


def test_tower_saves_a_loadable_clip_directory(tower_dir):
    model = CLIPVisionModel.from_pretrained(str(tower_dir))
    processor = CLIPImageProcessorPil.from_pretrained(str(tower_dir))
    assert model.config.hidden_size == 32 and model.config.image_size == 64 and model.config.patch_size == 16
    assert processor.crop_size == {"height": 64, "width": 64}
    image, _ = labelled_scene(np.random.default_rng(0), SPEC)
    pixels = preprocess_images([image], processor, "pad")
    features = model(pixels, output_hidden_states=True).hidden_states[TOWER.select_layer][:, 1:]
    assert features.shape == (1, 16, 32)


def test_tower_loads_through_the_llava_encoder(tower_dir):
    from vir.models.encoder import VisionTower

    tower = VisionTower.from_pretrained(tower_dir, select_layer=-1)
    assert tower(torch.zeros(2, 3, 64, 64)).shape == (2, 16, 32)


def test_dense_heads_learn_beyond_random_init(tower_dir):
    metrics = _metrics(tower_dir)
    start, final = metrics["history"][0]["accuracy"], metrics["final"]
    assert metrics["history"][0]["step"] == 0 and metrics["steps"] == VISION.max_steps
    assert set(DENSE_HEADS) <= set(final)
    # Empty cells are ~78% of all cells, so occupancy must beat that majority rate, not 50%.
    assert final["occupied"] > 0.9 and final["occupied"] > start["occupied"]
    assert final["colour"] > max(0.5, start["colour"])


def test_tower_is_reused_when_the_config_matches(tower_dir, monkeypatch):
    import vir.demo.vision_base as vision_base

    before = (tower_dir / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(vision_base, "_train", lambda *a, **k: pytest.fail("retrained a finished tower"))
    assert pretrain_vision_tower(tower_dir, SPEC, TOWER, VISION) == _metrics(tower_dir)
    assert (tower_dir / "model.safetensors").stat().st_mtime_ns == before


def test_tower_retrains_when_the_config_changes(tmp_path):
    cfg = dataclasses.replace(VISION, max_steps=2, eval_every=2, bank_size=32, eval_size=16)
    first = pretrain_vision_tower(tmp_path, SPEC, TOWER, cfg)
    second = pretrain_vision_tower(tmp_path, SPEC, TOWER, dataclasses.replace(cfg, learning_rate=1e-4))
    assert first["fingerprint"] != second["fingerprint"] and _metrics(tmp_path) == second


def test_tower_fingerprint_follows_the_scenes_not_the_question_records():
    from vir.demo.vision_base import vision_fingerprint

    same = vision_fingerprint(SPEC, TOWER, VISION)
    records_only = dataclasses.replace(SPEC, num_train=999, multi_turn_fraction=0.9, max_turns=5,
                                       question_mix={"count": 1.0}, sentence_answer_fraction=0.0)
    assert vision_fingerprint(records_only, TOWER, VISION) == same
    for change in ({"colours": ["red", "blue"]}, {"jitter": 0}, {"seed": 1}, {"max_objects": 3}):
        assert vision_fingerprint(dataclasses.replace(SPEC, **change), TOWER, VISION) != same, change


def test_tower_geometry_must_give_one_patch_per_cell(tmp_path):
    with pytest.raises(ValueError, match="model.vision_tower.image_size=64 / patch_size=8"):
        pretrain_vision_tower(tmp_path, SPEC, dataclasses.replace(TOWER, patch_size=8), VISION)


# --- LLM -------------------------------------------------------------------------------------------------------


def test_scene_description_keeps_objects_and_drops_relations():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = sample_scene(rng, SPEC)
        text = scene_description(rng, scene)
        assert all(f"row {o.row + 1}, column {o.col + 1}" in text.lower() for o in scene.objects)
        assert not any(phrase in text for phrase in (" left of ", " right of ", " above ", " below "))


def test_scene_qa_examples_put_the_description_where_the_image_goes():
    examples = scene_qa_examples(SPEC, 20, seed=1, stream=0)
    assert examples == scene_qa_examples(SPEC, 20, seed=1, stream=0)
    assert examples != scene_qa_examples(SPEC, 20, seed=1, stream=1)
    for example in examples:
        user, assistant = example["messages"]
        description, question = user.content.split("\n")
        assert (user.role, assistant.role) == ("user", "assistant") and assistant.content == example["answer"]
        assert "row" in description.lower() and question.endswith(("?", ".")) and "<image>" not in user.content
    # The program's op names the sub-kind of question (benchmarks/probe_text_base.py --by-op scores by it).
    ops = {e["question_type"]: set() for e in examples}
    for example in examples:
        ops[example["question_type"]].add(example["op"])
    assert ops.get("count", {"count_colour"}) == {"count_colour"} and ops["relation"] <= {"relation_where",
                                                                                           "relation_yesno"}


def test_scene_grid_is_one_token_per_cell_in_reading_order():
    rng = np.random.default_rng(4)
    vocabulary = set(grid_tokens(SPEC))
    assert len(vocabulary) == 1 + 2 * len(SPEC.colours) * len(SPEC.shapes)
    for _ in range(50):
        scene = sample_scene(rng, SPEC)
        cells = re.findall(r"<\|grid_[a-z_]+\|>", scene_grid(scene))
        assert "".join(cells) == scene_grid(scene) and len(cells) == SPEC.grid ** 2
        assert set(cells) <= vocabulary
        by_cell = {o.row * SPEC.grid + o.col: o for o in scene.objects}
        for k, token in enumerate(cells):
            obj = by_cell.get(k)
            assert token == (f"<|grid_{obj.size}_{obj.colour}_{obj.shape}|>" if obj else "<|grid_empty|>")


def test_grid_scene_qa_reads_as_one_token_per_cell(synthetic_tokenizer_dir):
    """The grid takes the image block's place and length: grid*grid contiguous ids before the question."""
    tokenizer = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    tokenizer.add_tokens(grid_tokens(SPEC))
    grid_ids = set(tokenizer.convert_tokens_to_ids(grid_tokens(SPEC)))
    examples = scene_qa_examples(SPEC, 20, seed=1, stream=0, scene_format="grid")
    for example in examples:
        user, assistant = example["messages"]
        grid, question = user.content.split("\n")
        assert question.endswith(("?", ".")) and assistant.content == example["answer"]
        assert grid.startswith("<|grid_") and grid.endswith("|>")
        ids, _ = encode_document(example["messages"], tokenizer, max_length=512, loss_on="assistant")
        in_grid = [k for k, i in enumerate(ids) if i in grid_ids]
        assert len(in_grid) == SPEC.grid ** 2 and in_grid == list(range(in_grid[0], in_grid[0] + SPEC.grid ** 2))
    with pytest.raises(ValueError, match="demo.bases.llm.scene_format"):
        scene_qa_examples(SPEC, 2, seed=1, stream=0, scene_format="pixels")


def test_scene_caption_takes_the_plain_template_with_the_grid_as_image_block(synthetic_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    tokenizer.add_tokens(grid_tokens(SPEC))
    captions = scene_caption_examples(SPEC, 10, seed=3, stream=0)
    assert captions == scene_caption_examples(SPEC, 10, seed=3, stream=0)  # deterministic
    for document in captions:
        assert isinstance(document, SceneCaption) and document.caption.split()[-1].endswith(".")
        grid_ids = tokenizer(document.scene, add_special_tokens=False)["input_ids"]
        caption_ids = tokenizer(document.caption, add_special_tokens=False)["input_ids"]
        assert len(grid_ids) == SPEC.grid ** 2
        ids, labels = encode_document(document, tokenizer, max_length=512, loss_on="assistant")
        assert ids == [tokenizer.bos_token_id] + grid_ids + caption_ids + [tokenizer.eos_token_id]
        assert labels == [IGNORE_INDEX] * (1 + len(grid_ids)) + caption_ids + [tokenizer.eos_token_id]
    # The stage-1 records' layout, with grid tokens where the image block's ids are.
    image_ids, image_labels = build_example(to_messages(SceneCaption("<image>", captions[0].caption)), tokenizer,
                                            "plain", -1, SPEC.grid ** 2)
    ids, labels = encode_document(captions[0], tokenizer, max_length=512, loss_on="assistant")
    assert labels == image_labels and [i for i in image_ids if i != -1] == [ids[0]] + ids[1 + SPEC.grid ** 2:]


def test_scene_qa_follow_up_turns_ask_about_the_same_scene():
    examples = scene_qa_examples(SPEC, 30, seed=2, stream=0, turns=4)
    assert max(len(e["messages"]) for e in examples) == 8
    for example in examples:
        messages = example["messages"]
        assert [m.role for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert all("\n" not in m.content for m in messages[2:])  # only the first turn carries the description
        questions = [messages[0].content.split("\n")[1]] + [m.content for m in messages[2::2]]
        assert len(set(questions)) == len(questions)
        assert messages[1].content == example["answer"]


def test_base_question_mix_replaces_the_test_mix_for_training_documents_only():
    assert base_qa_spec(SPEC, LLMPretrainConfig()) is SPEC  # empty: the data set's own mix
    cfg = compose_config(["experiment=local_debug", "++demo.bases.llm.question_mix={count:1,exists:1,attribute:1}"])
    pretrain = LLMPretrainConfig(question_mix=dict(cfg.demo.bases.llm.question_mix))
    spec = base_qa_spec(SPEC, pretrain)
    assert spec.question_mix == {"count": 1.0, "exists": 1.0, "attribute": 1.0}
    assert {e["question_type"] for e in scene_qa_examples(spec, 60, seed=0, stream=0)} == {"count", "exists",
                                                                                           "attribute"}
    assert SPEC.question_mix["relation"] > 0  # held-out scoring keeps the data set's mix
    with pytest.raises(ValueError, match=r"bases\.llm\.question_mix=.*bogus"):
        base_qa_spec(SPEC, LLMPretrainConfig(question_mix={"count": 1.0, "bogus": 1.0}))
    with pytest.raises(ValueError, match=r"bases\.llm\.question_mix"):
        base_qa_spec(SPEC, LLMPretrainConfig(question_mix={"count": 0.0}))


def test_corpus_text_becomes_alternating_turns():
    messages = to_messages("How many red objects are there?\ntwo\nIs there a red circle?\nyes")
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[3].content == "yes"


def test_encode_document_labels(synthetic_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    document = "Describe the image.\nThere are two objects."
    ids, labels = encode_document(document, tokenizer, max_length=512, loss_on="all")
    assert ids == tokenizer.apply_chat_template(to_messages_dicts(document), tokenize=True, return_dict=False)
    assert labels == [IGNORE_INDEX] + ids[1:]
    ids_a, labels_a = encode_document(document, tokenizer, max_length=512, loss_on="assistant")
    assert (ids_a, labels_a) == tuple(build_example(to_messages(document), tokenizer, "llama3", -1, 1))
    assert encode_document(document, tokenizer, max_length=5)[0] == ids[:5]
    with pytest.raises(ValueError, match="demo.bases.llm.loss_on"):
        encode_document(document, tokenizer, max_length=8, loss_on="answers")


def test_labelled_loss_is_the_models_loss_on_fewer_positions(synthetic_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    torch.manual_seed(0)
    model = build_llama(LLM, tokenizer)
    documents = [e["messages"] for e in scene_qa_examples(SPEC, 6, seed=0, stream=0)]
    batch = collate([encode_document(d, tokenizer, 512, loss_on="assistant") for d in documents],
                      tokenizer.eos_token_id)
    loss, tokens = LabelledLoss(model)(**batch)
    torch.testing.assert_close(loss, model(**batch).loss)
    assert tokens == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) > len(documents)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    unlabelled = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    nothing, tokens = LabelledLoss(model)(**unlabelled)
    nothing.backward()  # a process whose share has no labels still joins DDP's gradient reduction
    assert nothing.item() == 0.0 and tokens == 0 and all(p.grad is not None for p in model.parameters())


def test_labelled_tokens_per_document_counts_what_is_trained(synthetic_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    answer = [{"role": "user", "content": "Is there a red circle?"}, {"role": "assistant", "content": "yes"}]
    caption = SceneCaption("x", "There are two objects.")
    cfg = dataclasses.replace(LLM_PRETRAIN, loss_on="assistant")
    one = labelled_tokens_per_document([answer], tokenizer, cfg)
    assert one == len(tokenizer("yes", add_special_tokens=False)["input_ids"]) + 1  # the answer and <|eot_id|>
    long = labelled_tokens_per_document([caption], tokenizer, cfg)
    assert labelled_tokens_per_document([answer, caption], tokenizer, cfg) == (one + long) / 2


def test_llm_trainer_batches_cover_each_epoch_and_group_lengths(synthetic_tokenizer_dir, tmp_path):
    """The base's Trainer draws every document once per epoch, in batches of similar length when grouped."""
    tokenizer = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    documents = [e["messages"] for e in scene_qa_examples(SPEC, 60, seed=0, stream=0)]
    documents += scene_caption_examples(SPEC, 36, seed=0, stream=1, scene_format="description")
    cfg = dataclasses.replace(LLM_PRETRAIN, batch_size=8)
    dataset = DocumentDataset(documents, tokenizer, cfg)
    lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]

    def epoch(grouping):
        args = pretrain_arguments(tmp_path, max_steps=12, batch_size=8, learning_rate=1e-3, weight_decay=0.0,
                                  warmup_ratio=0.0, seed=0)
        trainer = _BaseTrainer(model=LabelledLoss(build_llama(LLM, tokenizer)), args=args, train_dataset=dataset,
                               length_grouping=grouping, tokens_per_batch=1.0)
        order = list(trainer._get_train_sampler())
        return [order[k : k + 8] for k in range(0, len(order), 8)]

    for grouping in (1, 4):
        batches = epoch(grouping)
        assert sorted(i for batch in batches for i in batch) == list(range(len(documents)))  # each exactly once
    spread = {g: sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch(g)) for g in (1, 4)}
    assert spread[4] < spread[1] / 2  # grouped batches pad far less
    with pytest.raises(ValueError, match="length_grouping"):
        epoch(0)


def to_messages_dicts(document):
    return [{"role": m.role, "content": m.content} for m in to_messages(document)]


def test_llm_saves_a_self_contained_llama_directory(llm_dir, synthetic_tokenizer_dir):
    model = LlamaForCausalLM.from_pretrained(str(llm_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    assert model.config.vocab_size == len(tokenizer) == len(AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir)))
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tokenizer.chat_template and tokenizer.eos_token == "<|eot_id|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_llm_loss_falls_and_qa_is_scored(llm_dir):
    history = _metrics(llm_dir)["history"]
    assert [record["step"] for record in history] == [15, 30]
    assert history[-1]["loss"] < 0.85 * history[0]["loss"]
    assert {"count", "exists", "attribute", "relation", "overall"} >= set(history[-1]["accuracy"]) >= {"overall"}


def test_llm_is_reused_when_the_inputs_match(llm_dir, synthetic_tokenizer_dir, monkeypatch):
    import vir.demo.llm_base as llm_base

    def refuse(*args, **kwargs):
        raise RuntimeError("retrained a finished LLM")

    monkeypatch.setattr(llm_base, "_train", refuse)
    documents = corpus_texts(SPEC) + [e["messages"] for e in scene_qa_examples(SPEC, 40, seed=0, stream=0)]
    metrics = pretrain_llm(llm_dir, synthetic_tokenizer_dir, documents, LLM, LLM_PRETRAIN,
                           eval_examples=scene_qa_examples(SPEC, 8, seed=0, stream=1))
    assert metrics == _metrics(llm_dir)
    with pytest.raises(RuntimeError, match="retrained"):  # other documents: a different base
        pretrain_llm(llm_dir, synthetic_tokenizer_dir, documents[:-1], LLM, LLM_PRETRAIN)


def test_llm_vocabulary_gains_the_extra_tokens(tmp_path, synthetic_tokenizer_dir):
    documents = [e["messages"] for e in scene_qa_examples(SPEC, 16, seed=0, stream=0, scene_format="grid")]
    small = dataclasses.replace(LLM_PRETRAIN, max_steps=2, eval_size=0)
    pretrain_llm(tmp_path, synthetic_tokenizer_dir, documents, LLM, small, extra_tokens=grid_tokens(SPEC))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    base = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    assert len(tokenizer) == len(base) + len(grid_tokens(SPEC))
    assert LlamaForCausalLM.from_pretrained(str(tmp_path)).config.vocab_size == len(tokenizer)
    cell = grid_tokens(SPEC)[3]
    assert tokenizer.convert_ids_to_tokens(tokenizer(cell, add_special_tokens=False)["input_ids"]) == [cell]


def test_init_from_words_sums_the_word_embeddings(synthetic_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(synthetic_tokenizer_dir))
    tokenizer.add_tokens(grid_tokens(SPEC))
    model = build_llama(LLM, tokenizer)
    words = grid_token_words(SPEC)
    assert GRID_EMPTY not in words and len(words) == len(grid_tokens(SPEC)) - 1
    cell = grid_token("small", "red", "circle")
    assert words[cell] == "small red circle"
    init_from_words(model, tokenizer, words)
    table = model.get_input_embeddings().weight
    parts = tokenizer(" small red circle", add_special_tokens=False)["input_ids"]
    assert torch.equal(table[tokenizer.convert_tokens_to_ids(cell)], table[parts].sum(dim=0))
    with pytest.raises(ValueError, match="grid_odd.*not in the vocabulary"):
        init_from_words(model, tokenizer, {"<|grid_odd|>": "odd"})
    with pytest.raises(ValueError, match="no words"):
        init_from_words(model, tokenizer, {cell: " "})


# --- both, from a composed config --------------------------------------------------------------------------


@pytest.mark.slow
def test_build_bases_from_the_shipped_config(tmp_path, monkeypatch):
    overrides = [
        "experiment=local_debug_scratch", f"data.image_folder={tmp_path / 'data'}",
        "demo.synthetic.num_stage1=20", "demo.synthetic.num_train=40", "demo.synthetic.num_eval=4",
        "demo.synthetic.num_test=4", "demo.synthetic.vocab_size=400",
        "model.vision_tower.image_size=64", "model.vision_tower.patch_size=16", "model.vision_tower.hidden_size=32",
        "model.vision_tower.intermediate_size=64", "model.vision_tower.num_hidden_layers=2",
        "model.vision_tower.num_attention_heads=2",
        "model.llm.hidden_size=32", "model.llm.intermediate_size=64", "model.llm.num_hidden_layers=1",
        "demo.bases.vision.max_steps=3", "demo.bases.vision.bank_size=32", "demo.bases.vision.eval_size=16",
        "demo.bases.vision.eval_every=3", "demo.bases.llm.max_steps=3", "demo.bases.llm.batch_size=4", "demo.bases.llm.eval_size=2",
        "demo.bases.llm.num_scene_qa=10", "demo.bases.llm.eval_every=3",
    ]
    cfg = compose_config(overrides)
    llm_dir, clip_dir = build_bases(tmp_path / "bases", cfg)
    assert (llm_dir, clip_dir) == (tmp_path / "bases" / "llm", tmp_path / "bases" / "clip")
    assert CLIPVisionModel.from_pretrained(str(clip_dir)).config.hidden_size == 32
    assert LlamaForCausalLM.from_pretrained(str(llm_dir)).config.num_hidden_layers == 1
    stamps = [(d / PRETRAIN_METRICS_FILE).stat().st_mtime_ns for d in (llm_dir, clip_dir)]
    assert build_bases(tmp_path / "bases", cfg) == (llm_dir, clip_dir)
    assert [(d / PRETRAIN_METRICS_FILE).stat().st_mtime_ns for d in (llm_dir, clip_dir)] == stamps

    # demo.bases.source: finished bases are copied and reused as they are, never retrained.
    def no_training(*args, **kwargs):
        raise AssertionError("a base from demo.bases.source was retrained")

    monkeypatch.setattr(vision_base, "_train", no_training)
    monkeypatch.setattr(llm_base, "_train", no_training)
    sourced = compose_config([*overrides, f"demo.bases.source={tmp_path / 'bases'}"])
    copied = build_bases(tmp_path / "copy", sourced)
    assert copied == (tmp_path / "copy" / "llm", tmp_path / "copy" / "clip")
    for name in ("llm/model.safetensors", "llm/tokenizer.json", "clip/model.safetensors", f"clip/{PRETRAIN_METRICS_FILE}"):
        assert (tmp_path / "copy" / name).read_bytes() == (tmp_path / "bases" / name).read_bytes()
    # Other inputs than the source's (here the LLM budget) are an error naming the key and the way out.
    with pytest.raises(BaseMismatchError, match=r"demo.bases.source=.*LLM base.*demo.bases.source=null"):
        build_bases(tmp_path / "copy", compose_config([*overrides, f"demo.bases.source={tmp_path / 'bases'}",
                                                        "demo.bases.llm.max_steps=4"]))
    with pytest.raises(FileNotFoundError, match=r"demo.bases.source=.*nowhere.*demo.bases.source=null"):
        build_bases(tmp_path / "copy", compose_config([*overrides, f"demo.bases.source={tmp_path / 'nowhere'}"]))
