"""vir-demo's chat engine and page handlers without a server, on a tiny trained run: the greedy answer is
vir-eval's, it streams, and every bad input costs a message while the engine keeps answering."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from app_fixtures import MAX_NEW_TOKENS, converted, eval_reference
from PIL import Image

from vir.app import run_info
from vir.app.chat import ChatEngine, ChatInputError, Sampling, Turn, open_images
from vir.app.loading import ModelDirError, load_chat_model
from vir.app.ui import Handlers
from vir.cli import demo as demo_cli

GREEDY = Sampling(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return eval_reference(tmp_path_factory)


@pytest.fixture(scope="module")
def engine(ref):
    return ChatEngine(load_chat_model(ref.run_dir, device="cpu"))


def _ask(engine, ref, sampling=GREEDY):
    return list(engine.stream([Turn(ref.question, open_images([ref.image]))], sampling))


def test_the_streamed_greedy_answer_is_vir_evals(engine, ref):
    partials = _ask(engine, ref)
    assert ref.answer, "the reference answer is empty: the comparison would prove little"
    assert partials[-1] == ref.answer
    # Another image changes the prompt: the engine really looks at the upload.
    other = Image.new("RGB", (32, 32), (255, 0, 0))
    inputs, _ = engine.prepare([Turn(ref.question, [other])], GREEDY)
    mine, _ = engine.prepare([Turn(ref.question, open_images([ref.image]))], GREEDY)
    assert not torch.equal(inputs["pixel_values"], mine["pixel_values"])


class _SlowModel:
    """Stands in for the model's `generate`: pushes the ids of WORDS one at a time into the streamer and, after
    the first word, waits until the consumer has seen a partial answer (proof that it streams)."""

    WORDS = "one two three four"

    def __init__(self, model, tokenizer, seen: threading.Event):
        self.config, self.model, self.tokenizer, self.seen = model.config, model, tokenizer, seen
        self.waited = None

    def parameters(self):
        return self.model.parameters()

    def generate(self, input_ids, streamer, **kwargs):
        streamer.put(input_ids)  # the prompt, skipped by skip_prompt
        ids = self.tokenizer(self.WORDS, add_special_tokens=False)["input_ids"]
        for k, token in enumerate([*ids, self.tokenizer.eos_token_id]):
            streamer.put(torch.tensor([token]))
            if k == 1:
                self.waited = self.seen.wait(timeout=20)
        streamer.end()
        return torch.cat([input_ids, torch.tensor([[*ids, self.tokenizer.eos_token_id]])], dim=1)


def test_partial_answers_reach_the_caller_while_generating(engine, ref):
    seen = threading.Event()
    slow = _SlowModel(engine.cm.model, engine.cm.tokenizer, seen)
    streaming = ChatEngine(dataclasses.replace(engine.cm, model=slow))
    partials = []
    for partial in streaming.stream([Turn(ref.question, open_images([ref.image]))], GREEDY):
        partials.append(partial)
        seen.set()
    assert slow.waited is True, "no partial answer arrived before generation finished"
    assert partials[0] == "one" and partials[-1] == _SlowModel.WORDS and len(set(partials)) >= 3, partials
    for shorter, longer in zip(partials, partials[1:]):
        assert longer.startswith(shorter), partials


def test_a_second_turn_carries_the_first(engine, ref):
    first = Turn(ref.question, open_images([ref.image]), ref.answer)
    messages, images = engine.messages([first, Turn("And the other one?")])
    assert [m.role for m in messages] == ["user", "assistant", "user"] and len(images) == 1
    assert messages[0].content == f"{engine.cm.image_token}\n{ref.question}"
    inputs, _ = engine.prepare([first, Turn("And the other one?")], GREEDY)
    prompt = engine.cm.tokenizer.decode(inputs["input_ids"][0])
    assert prompt.index(ref.question) < prompt.index(ref.answer) < prompt.index("And the other one?")


def test_two_images_get_two_tags(engine, ref):
    images = open_images([ref.image, ref.image])
    messages, seen = engine.messages([Turn("Compare them.", images)])
    assert messages[0].content.count(engine.cm.image_token) == 2 and len(seen) == 2
    inputs, _ = engine.prepare([Turn("Compare them.", images)], GREEDY)
    assert inputs["pixel_values"].shape[0] == 2


def test_sampling_takes_the_sliders(engine, ref, monkeypatch):
    """The page's temperature, top-p and max-new-tokens sliders reach `generate`; temperature 0 is greedy."""
    seen = []
    generate = engine.cm.model.generate

    def recording(**kwargs):
        seen.append({k: kwargs.get(k) for k in ("do_sample", "temperature", "top_p", "max_new_tokens")})
        return generate(**kwargs)

    monkeypatch.setattr(engine.cm.model, "generate", recording)
    _ask(engine, ref, Sampling(temperature=1.5, top_p=0.9, max_new_tokens=3))
    _ask(engine, ref, Sampling(temperature=0.0, top_p=0.5, max_new_tokens=2))
    assert seen == [{"do_sample": True, "temperature": 1.5, "top_p": 0.9, "max_new_tokens": 3},
                    {"do_sample": False, "temperature": None, "top_p": None, "max_new_tokens": 2}]


def _bad_inputs(tmp_path, ref, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(ref.image.read_bytes()[:60])
    yield "notes.txt", lambda: open_images([text])
    yield "broken.png", lambda: open_images([corrupt])
    yield "empty", lambda: [Turn("   ", open_images([ref.image]))]
    yield "context", lambda: [Turn("red " * 2000, open_images([ref.image]))]
    yield "tags", lambda: [Turn("<image> <image> <image> two?", open_images([ref.image, ref.image]))]
    monkeypatch.setattr("vir.data.images.MAX_IMAGE_PIXELS", 100)  # the test image is 32 x 32
    yield "too large", lambda: open_images([ref.image])


def test_every_bad_input_is_a_message_and_the_engine_keeps_answering(engine, ref, tmp_path, monkeypatch):
    messages = {}
    for name, make in _bad_inputs(tmp_path, ref, monkeypatch):
        with pytest.raises(ChatInputError) as err:
            engine.answer(make(), GREEDY)
        messages[name] = str(err.value)
    assert "notes.txt" in messages["notes.txt"] and "not an image" in messages["notes.txt"]
    assert "broken.png" in messages["broken.png"] and "corrupt" in messages["broken.png"]
    assert "empty" in messages["empty"]
    assert f"context is {engine.cm.context_length} tokens" in messages["context"]
    assert "3 <image> tags for 2 images" in messages["tags"]
    assert "too large" in messages["too large"]
    monkeypatch.undo()
    assert engine.answer([Turn(ref.question, open_images([ref.image]))], GREEDY) == ref.answer


def test_the_page_handlers_show_errors_and_answers(engine, ref, tmp_path):
    handlers = Handlers(engine)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    *_, (chat, turns, status, question, files) = handlers.send(ref.question, [str(text)], [], 0.0, 1.0,
                                                                MAX_NEW_TOKENS)
    assert "Error" in status and "notes.txt" in status and chat == [] and turns == []
    assert question == ref.question and files is None  # the question is kept for the next try
    outputs = list(handlers.send(ref.question, [str(ref.image)], [], 0.0, 1.0, MAX_NEW_TOKENS))
    chat, turns, status, question, files = outputs[-1]
    assert status.startswith("Done") and chat[-1] == {"role": "assistant", "content": ref.answer}
    assert len(turns) == 1 and turns[0].answer == ref.answer and question == "" and files is None
    *_, (chat2, turns2, status2) = handlers.regenerate(turns, 0.0, 1.0, MAX_NEW_TOKENS)
    assert status2.startswith("Done") and chat2 == chat and turns2[0].answer == ref.answer
    assert handlers.clear()[:2] == ([], [])


def test_run_info_reads_the_run_files(engine, ref, tmp_path):
    header = run_info.header_markdown(engine.cm)
    assert str(ref.run_dir) in header and "cpu" in header and "stage2_lora" in header
    examples = run_info.example_questions(engine.cm)
    assert examples and all(Image.open(path).size for path, _ in examples)
    assert all("<image>" not in question and question for _, question in examples)
    (ref.run_dir / "metrics.json").write_text('{"accuracy": 0.5, "blind_accuracy": 0.25, "n": 4, "per_type": '
                                              '{"count": {"accuracy": 0.5, "blind_accuracy": 0.25, "n": 4}}}')
    headers, rows = run_info.metrics_table(ref.run_dir / "checkpoint-2")
    assert headers == ["type", "n", "accuracy", "blind accuracy"]
    assert rows == [["count", 4, 0.5, 0.25], ["overall", 4, 0.5, 0.25]]
    assert run_info.metrics_table(tmp_path) == ([], [])


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: tmp / "missing", "no such directory"),
    (lambda tmp: tmp, "vir_config.yaml is missing"),
])
def test_vir_demo_on_a_wrong_path_exits_2_naming_it(make, expected, tmp_path, capsys):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as err:
        demo_cli.main([str(path), "--port", "7999"])
    message = capsys.readouterr().err
    assert err.value.code == 2 and str(path) in message and expected in message
    with pytest.raises(ModelDirError):
        load_chat_model(path)


@pytest.mark.parametrize("tool", ["vir-merge", "vir-export"])
def test_a_merged_or_exported_run_answers_the_same(tool, ref, tmp_path):
    """vir-demo also serves a vir-merge checkpoint (through load_run) and a vir-export directory (transformers'
    LlavaForConditionalGeneration, prompted by its processor's chat template): the same greedy answer."""
    out = converted(tool, ref.run_dir, tmp_path / "out")
    cm = load_chat_model(out, device="cpu")
    assert cm.kind == ("hf" if tool == "vir-export" else "vir")
    engine = ChatEngine(cm)
    assert engine.answer([Turn(ref.question, open_images([ref.image]))], GREEDY) == ref.answer
    assert str(out) in run_info.header_markdown(cm)
    with pytest.raises(ChatInputError, match="context"):
        engine.answer([Turn("red " * (cm.context_length + 10))], GREEDY)


def test_a_reader_that_leaves_mid_answer_stops_the_generation(engine, ref):
    seen = threading.Event()
    slow = _SlowModel(engine.cm.model, engine.cm.tokenizer, seen)
    stream = ChatEngine(dataclasses.replace(engine.cm, model=slow)).stream(
        [Turn(ref.question, open_images([ref.image]))], GREEDY)
    assert next(stream) == "one"
    seen.set()
    stream.close()  # returns only once the generating thread has ended: the lock is free for the next question
    assert engine.answer([Turn(ref.question, open_images([ref.image]))], GREEDY) == ref.answer

