"""Exact-match evaluation: items from LLaVA-format files, per-type scores, the blind (black image) baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_fixtures import run_config, synthetic_data, tiny_bases

from vir.data.conversation import Message
from vir.inference import evaluate as evaluate_module
from vir.inference.evaluate import UNTYPED, blank, evaluate, evaluate_with_blind, load_eval_items, score
from vir.inference.generate import generate_answers
from vir.models.builder import build_all


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    return synthetic_data(tmp_path_factory)


@pytest.fixture(scope="session")
def items(data):
    return load_eval_items(data.eval, data.root)


def test_load_eval_items_reads_the_synthetic_eval_split(data, items):
    records = json.loads(data.eval.read_text())
    assert [i.id for i in items] == [r["id"] for r in records]
    for item, record in zip(items, records):
        assert item.question_type == record["question_type"] and item.reference == record["answer"]
        assert item.image_paths == [record["image"]] and len(item.query.images) == 1
        assert item.query.messages == [Message("user", record["conversations"][0]["value"])]
    assert {i.question_type for i in items} == {"count", "exists", "attribute", "relation"}


def test_load_eval_items_prompt_is_everything_before_the_last_answer(tmp_path):
    Image.new("RGB", (10, 10), (0, 200, 0)).save(tmp_path / "a.png")
    records = [
        {"id": "multi", "image": "a.png", "question_type": "attribute", "answer": "Green",
         "conversations": [{"from": "human", "value": "<image>\nIs there a shape?"}, {"from": "gpt", "value": "yes"},
                           {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "It is green."}]},
        {"id": "text", "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
    ]
    (tmp_path / "items.json").write_text(json.dumps(records))
    multi, text = load_eval_items(tmp_path / "items.json")  # images resolve next to the file by default
    assert multi.reference == "Green" and multi.question_type == "attribute"  # `answer` wins over the last turn
    assert [m.role for m in multi.query.messages] == ["user", "assistant", "user"]
    assert multi.query.images[0].getpixel((0, 0)) == (0, 200, 0)
    assert (text.reference, text.question_type, text.query.images) == ("hi", UNTYPED, [])


def test_load_eval_items_names_the_record_with_a_missing_image(tmp_path):
    record = {"id": "r7", "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}
    (tmp_path / "items.json").write_text(json.dumps([record]))
    with pytest.raises(FileNotFoundError, match="'r7'.*gone.png"):
        load_eval_items(tmp_path / "items.json", image_folder=tmp_path)


def test_score_is_exact_match_overall_and_per_type(items):
    chosen = items[:4]
    predictions = [f"  {chosen[0].reference.upper()}. ", "definitely not", chosen[2].reference, ""]
    result = score(chosen, predictions)
    hits = [True, False, True, False]
    assert result.n == 4 and result.accuracy == 0.5
    expected = {}
    for item, ok in zip(chosen, hits):
        expected.setdefault(item.question_type, []).append(ok)
    assert result.per_type == {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(expected.items())}
    assert [row["correct"] for row in result.predictions] == hits
    assert result.predictions[1] == {"id": chosen[1].id, "type": chosen[1].question_type,
                                     "prediction": "definitely not", "reference": chosen[1].reference,
                                     "correct": False}
    assert result.to_dict() == {"accuracy": 0.5, "n": 4, "per_type": result.per_type}
    assert score([], []).accuracy == 0.0


def test_blank_replaces_every_image_with_a_black_one_of_the_same_size(items):
    blind = blank(items)
    for seen, unseen in zip(items, blind):
        assert (unseen.id, unseen.reference, unseen.question_type) == (seen.id, seen.reference, seen.question_type)
        assert unseen.query.messages == seen.query.messages
        assert [im.size for im in unseen.query.images] == [im.size for im in seen.query.images]
        assert all(not np.asarray(im).any() for im in unseen.query.images)
        assert any(np.asarray(im).any() for im in seen.query.images)  # the originals are untouched


def test_evaluate_scores_the_models_greedy_answers(tmp_path_factory, items):
    bases = tiny_bases(tmp_path_factory)
    torch.manual_seed(0)
    model, tokenizer, processor = build_all(run_config(bases, tmp_path_factory.mktemp("unused"), "stage2_full"))
    model.eval()
    result = evaluate(model, tokenizer, processor, items, max_new_tokens=3, batch_size=3, progress=False)
    predictions = generate_answers(model, tokenizer, processor, [i.query for i in items], max_new_tokens=3)
    assert [row["prediction"] for row in result.predictions] == predictions
    assert result.to_dict() == score(items, predictions).to_dict()


def test_evaluate_with_blind_runs_the_same_items_with_black_images(monkeypatch, items):
    def fake_generate(model, tokenizer, processor, queries, **kwargs):
        """Answers right exactly when it can see the image (any non-black pixel)."""
        by_prompt = {id(i.query.messages): i.reference for i in items}
        return [by_prompt[id(q.messages)] if any(np.asarray(im).any() for im in q.images) else "no"
                for q in queries]

    monkeypatch.setattr(evaluate_module, "generate_answers", fake_generate)
    metrics = evaluate_with_blind(None, None, None, items)
    assert metrics["accuracy"] == 1.0 and metrics["n"] == len(items)
    blind_hits = [i.reference == "no" for i in items]
    assert metrics["blind_accuracy"] == sum(blind_hits) / len(items) < 1.0
    assert set(metrics["per_type"]) == {i.question_type for i in items}
    for question_type, row in metrics["per_type"].items():
        typed = [hit for i, hit in zip(items, blind_hits) if i.question_type == question_type]
        assert row == {"accuracy": 1.0, "blind_accuracy": sum(typed) / len(typed), "n": len(typed)}
    assert len(metrics["predictions"]) == len(items)
