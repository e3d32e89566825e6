"""The synthetic VQA data set: scenes, questions checked against an independent solver, files on disk."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vir.demo.synthetic import (
    PALETTE,
    QUESTION_TYPES,
    SIZES,
    Scene,
    SceneObject,
    SyntheticConfig,
    as_spec,
    cell_labels,
    corpus_texts,
    generate,
    load_scenes,
    plan_splits,
    render_scene,
    sample_scene,
)
from vir.demo.synthetic.language import SENTENCE_SUFFIX
from vir.demo.synthetic.scene import BACKGROUND, check_spec
from vir.inference.scoring import normalize_answer

SMALL = SyntheticConfig(num_stage1=20, num_train=80, num_eval=20, num_test=80, vocab_size=400)
NUMBERS = "zero one two three four five".split()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    return generate(root, SMALL)


def _load(path: Path):
    return json.loads(Path(path).read_text())


# --- scenes -------------------------------------------------------------------------------------------------


def test_sample_scene_places_objects_in_distinct_cells_in_reading_order():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = sample_scene(rng, SMALL)
        cells = [(o.row, o.col) for o in scene.objects]
        assert SMALL.min_objects <= len(cells) <= SMALL.max_objects
        assert cells == sorted(set(cells))
        for obj in scene.objects:
            assert obj.colour in SMALL.colours and obj.shape in SMALL.shapes and obj.size in SIZES
            assert 0 <= obj.row < SMALL.grid and 0 <= obj.col < SMALL.grid and abs(obj.dx) <= SMALL.jitter


def test_render_scene_draws_each_object_inside_its_own_cell():
    rng = np.random.default_rng(1)
    cell = SMALL.image_size // SMALL.grid
    for _ in range(20):
        scene = sample_scene(rng, SMALL)
        pixels = np.asarray(render_scene(scene, SMALL.image_size))
        assert pixels.shape == (SMALL.image_size, SMALL.image_size, 3)
        occupied = {(o.row, o.col): o for o in scene.objects}
        for row in range(SMALL.grid):
            for col in range(SMALL.grid):
                patch = pixels[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell].reshape(-1, 3)
                colours = {tuple(p) for p in patch}
                obj = occupied.get((row, col))
                expected = {BACKGROUND} if obj is None else {BACKGROUND, PALETTE[obj.colour]}
                assert colours == expected


def test_cell_labels_are_row_major_with_minus_one_for_empty_cells():
    objects = (SceneObject("blue", "cross", "large", 0, 1), SceneObject("red", "circle", "small", 2, 3))
    scene = Scene(objects, 4, tuple(SMALL.colours), tuple(SMALL.shapes))
    labels = cell_labels(scene, 4)
    assert labels.shape == (16, 4) and labels.dtype == np.int64
    assert labels[1].tolist() == [1, SMALL.colours.index("blue"), SMALL.shapes.index("cross"), 1]
    assert labels[2 * 4 + 3].tolist() == [1, SMALL.colours.index("red"), SMALL.shapes.index("circle"), 0]
    empty = [i for i in range(16) if i not in (1, 11)]
    assert (labels[empty] == [0, -1, -1, -1]).all()
    with pytest.raises(ValueError, match="grid"):
        cell_labels(scene, 8)


def test_bad_spec_names_the_config_key():
    with pytest.raises(ValueError, match="demo.synthetic.colours"):
        check_spec(dataclasses.replace(SMALL, colours=["red", "mauve"]))
    with pytest.raises(ValueError, match="demo.synthetic.question_mix"):
        plan_splits(dataclasses.replace(SMALL, question_mix={"colour": 1.0}), splits=("test",))


# --- questions, checked by a solver that shares no code with the generator ----------------------------------


def _only(scene: Scene, **attrs) -> SceneObject:
    matches = [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]
    assert len(matches) == 1, f"{attrs} names {len(matches)} objects in {scene}"
    return matches[0]


def _solve(scene: Scene, program: dict) -> str:
    op = program["op"]
    if op == "count_colour":
        return NUMBERS[sum(o.colour == program["colour"] for o in scene.objects)]
    if op == "exists":
        found = any(o.colour == program["colour"] and o.shape == program["shape"] for o in scene.objects)
        if not found:  # a near miss: the colour or the shape is in the scene
            assert any(o.colour == program["colour"] or o.shape == program["shape"] for o in scene.objects)
        return "yes" if found else "no"
    if op in ("shape_at", "colour_at"):
        obj = _only(scene, row=program["row"], col=program["col"])
        return obj.shape if op == "shape_at" else obj.colour
    if op == "colour_of_shape":
        return _only(scene, shape=program["shape"]).colour
    if op == "shape_of_colour":
        return _only(scene, colour=program["colour"]).shape
    if op == "size_of":
        return _only(scene, colour=program["colour"], shape=program["shape"]).size
    a, b = _only(scene, **program["a"]), _only(scene, **program["b"])
    holds = {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}
    if op == "relation_yesno":
        return "yes" if holds[program["relation"]] else "no"
    assert op == "relation_where"
    true = [r for r, ok in holds.items() if ok]
    assert len(true) == 1, "where-questions must be unambiguous"
    return true[0]


def _assert_text_names_the_program(question: str, program: dict) -> None:
    words = [program[k] for k in ("colour", "shape", "relation") if k in program]
    words += [f"{ref['colour']} {ref['shape']}" for ref in (program.get("a"), program.get("b")) if ref]
    assert all(w in question for w in words), (question, program)
    if "row" in program:
        row, col = program["row"], program["col"]
        vertical = {0: "top", SMALL.grid - 1: "bottom"}.get(row)
        horizontal = {0: "left", SMALL.grid - 1: "right"}.get(col)
        corner = f"the {vertical}-{horizontal} corner" if vertical and horizontal else None
        assert f"row {row + 1}, column {col + 1}" in question or (corner and corner in question), question


def test_every_eval_and_test_answer_matches_the_scene(dataset):
    scenes = load_scenes(dataset.scenes, SMALL)
    for path in (dataset.eval, dataset.test):
        for record in _load(path):
            question, answer = (t["value"] for t in record["conversations"])
            assert record["answer"] == answer
            assert record["short_answer"] == _solve(scenes[record["id"]], record["program"])
            _assert_text_names_the_program(question, record["program"])
            if question.endswith(SENTENCE_SUFFIX):
                words = normalize_answer(answer).replace("are no ", "are zero ").split()
                assert record["short_answer"] in words and answer.endswith(".")
            else:
                assert answer == record["short_answer"]


def test_every_question_type_is_at_least_15_percent_of_eval_and_test(dataset):
    for path in (dataset.eval, dataset.test):
        records = _load(path)
        counts = Counter(r["question_type"] for r in records)
        assert set(counts) == set(QUESTION_TYPES)
        assert all(counts[t] >= 0.15 * len(records) for t in QUESTION_TYPES), counts


def test_answers_are_balanced_so_the_text_alone_does_not_solve_them():
    spec = dataclasses.replace(SMALL, num_test=800)
    records = plan_splits(spec, splits=("test",))["test"].records
    by_type = {t: Counter(r["short_answer"] for r in records if r["question_type"] == t) for t in QUESTION_TYPES}
    assert 0.4 < by_type["exists"]["yes"] / sum(by_type["exists"].values()) < 0.6
    yes_no = by_type["relation"]["yes"] / (by_type["relation"]["yes"] + by_type["relation"]["no"])
    assert 0.4 < yes_no < 0.6
    count_share = {n: by_type["count"][n] / sum(by_type["count"].values()) for n in NUMBERS[:4]}
    assert all(0.15 < share < 0.35 for share in count_share.values()), count_share


def test_training_only_locate_questions_are_in_train_and_never_in_eval_or_test():
    spec = dataclasses.replace(SMALL, train_locate_fraction=0.3, multi_turn_fraction=0.0, caption_fraction=0.0)
    plans = plan_splits(spec, splits=("train", "test"))
    train = plans["train"]
    share = train.question_types["locate"] / sum(train.question_types.values())
    checked = 0
    assert 0.15 < share < 0.45, train.question_types
    for record, image in zip([r for r in train.records if "image" in r], train.images):
        question, answer = (t["value"] for t in record["conversations"])
        located = re.match(r"<image>\n(?:Where is|In which row and column is) the (\w+ \w+)\?", question)
        if located:
            (obj,) = [o for o in image.scene.objects if o.name == located.group(1)]
            assert f"row {obj.row + 1}, column {obj.col + 1}" in answer
            checked += 1
    assert checked == train.question_types["locate"] > 0
    assert "locate" not in plans["test"].question_types
    with pytest.raises(ValueError, match="train_locate_fraction"):
        plan_splits(dataclasses.replace(SMALL, train_locate_fraction=1.0), splits=("train",))


def test_train_training_records_are_well_formed(dataset):
    records = _load(dataset.train)
    assert len(records) == SMALL.num_train
    text_only = [r for r in records if "image" not in r]
    assert len(text_only) == round(SMALL.text_only_fraction * SMALL.num_train)
    assert any(len(r["conversations"]) >= 4 for r in records) and any(len(r["conversations"]) == 2 for r in records)
    for record in records:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        images_in_text = [t["value"].count("<image>") for t in turns]
        if "image" in record:
            assert turns[0]["value"].startswith("<image>\n") and images_in_text == [1] + [0] * (len(turns) - 1)
        else:
            assert sum(images_in_text) == 0


def test_stage1_captions_describe_every_object(dataset):
    scenes = load_scenes(dataset.scenes, SMALL)
    for record in _load(dataset.stage1):
        human, caption = (t["value"] for t in record["conversations"])
        assert human.startswith("<image>")
        for obj in scenes[record["id"]].objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in caption
            assert f"ow {obj.row + 1}, column {obj.col + 1}" in caption


# --- files on disk ------------------------------------------------------------------------------------------


def test_broken_files_are_really_broken_and_the_rest_load(dataset):
    manifest = _load(dataset.manifest)
    broken = {b["image"]: b["kind"] for b in manifest["broken"]}
    assert sorted(broken.values()) == ["empty", "missing", "truncated"]
    for rel, kind in broken.items():
        path = dataset.root / rel
        if kind == "missing":
            assert not path.exists()
            continue
        assert path.stat().st_size == 0 if kind == "empty" else path.stat().st_size > 0
        with pytest.raises(Exception):
            Image.open(path).convert("RGB")
    for split in ("train", "eval", "test"):
        for record in _load(getattr(dataset, split)):
            if "image" in record and record["image"] not in broken:
                assert Image.open(dataset.root / record["image"]).convert("RGB").size == (64, 64)


def test_generation_is_deterministic(dataset, tmp_path):
    again = generate(tmp_path / "again", SMALL)
    for name in ("stage1.json", "train.json", "eval.json", "test.json", "scenes.jsonl", "tokenizer/tokenizer.json"):
        assert (again.root / name).read_bytes() == (dataset.root / name).read_bytes(), name
    images = sorted(p.name for p in dataset.images.iterdir())
    assert images == sorted(p.name for p in again.images.iterdir())
    assert all((dataset.images / n).read_bytes() == (again.images / n).read_bytes() for n in images)
    other = plan_splits(dataclasses.replace(SMALL, seed=1), splits=("test",))["test"].records
    assert other != _load(dataset.test)


def test_eval_and_test_scenes_are_not_train_scenes(dataset):
    scenes = load_scenes(dataset.scenes, SMALL)
    keys = {split: {scenes[r["id"]].key() for r in _load(getattr(dataset, split)) if "image" in r}
            for split in ("stage1", "train", "eval", "test")}
    assert not (keys["eval"] | keys["test"]) & (keys["stage1"] | keys["train"])
    assert not keys["eval"] & keys["test"]


def test_generate_is_idempotent_and_regenerates_on_a_new_spec(tmp_path, monkeypatch):
    spec = dataclasses.replace(SMALL, num_stage1=4, num_train=10, num_eval=4, num_test=8)
    paths = generate(tmp_path, spec)
    stamp = paths.manifest.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although the manifest matches")

    monkeypatch.setattr("vir.demo.synthetic.writer.plan_splits", fail)
    assert generate(tmp_path, spec) == paths and paths.manifest.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    smaller = dataclasses.replace(spec, num_test=2)
    generate(tmp_path, smaller)
    assert len(_load(paths.test)) == 2 and not (paths.images / "test_000007.png").exists()
    assert _load(paths.manifest)["counts"]["test"]["records"] == 2


def test_manifest_counts_and_spec(dataset):
    manifest = _load(dataset.manifest)
    assert manifest["spec"] == dataclasses.asdict(SMALL)
    assert manifest["counts"]["test"]["records"] == SMALL.num_test
    assert sum(manifest["counts"]["test"]["question_types"].values()) == SMALL.num_test
    assert manifest["counts"]["train"]["text_only"] == round(SMALL.text_only_fraction * SMALL.num_train)


def test_tokenizer_loads_with_llama3_chat_template(dataset):
    from transformers import AutoTokenizer

    from vir.demo.tokenizer import LLAMA3_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(str(dataset.tokenizer))
    assert tokenizer.chat_template == LLAMA3_CHAT_TEMPLATE
    text = _load(dataset.test)[0]["conversations"][0]["value"].replace("<image>\n", "")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.split()) * 2  # trained on this text, the words are (mostly) single tokens


def test_corpus_texts_is_the_generated_text(dataset):
    texts = corpus_texts(SMALL)
    assert len(texts) == SMALL.num_stage1 + SMALL.num_train
    first_train = _load(dataset.train)[0]["conversations"]
    assert texts[SMALL.num_stage1] == "\n".join(t["value"].replace("<image>", "").strip() for t in first_train)


def test_spec_from_the_composed_config():
    from vir.utils.config import compose_config

    cfg = compose_config(["experiment=local_debug", "demo.synthetic.num_train=12", "demo.synthetic.colours=[red,blue]"])
    spec = as_spec(cfg.demo.synthetic)
    assert spec == dataclasses.replace(SyntheticConfig(), num_train=12, colours=["red", "blue"])


def test_spec_from_the_composed_config_is_plain_python():
    from vir.demo.synthetic import as_spec, spec_hash
    from vir.utils.config import compose_config

    spec = as_spec(compose_config(["experiment=local_debug"]).demo.synthetic)
    assert type(spec.colours) is list and type(spec.question_mix) is dict
    assert spec_hash(spec)  # json-serialisable


def test_caption_fraction_mixes_llava_style_caption_records_into_train():
    from vir.demo.synthetic.captions import CAPTION_INSTRUCTIONS
    from vir.demo.synthetic.splits import plan_train

    spec = dataclasses.replace(SMALL, caption_fraction=0.25)
    plan = plan_train(spec)
    captions = [r for r in plan.records if r["conversations"][0]["value"].split("\n", 1)[-1] in CAPTION_INSTRUCTIONS]
    assert plan.captions == len(captions) == round(0.25 * SMALL.num_train)
    assert all("image" in r and len(r["conversations"]) == 2 for r in captions)
    assert sum("image" not in r for r in plan.records) == round(SMALL.text_only_fraction * SMALL.num_train)
    # the caption names every object of its own scene, in reading order
    by_id = {image.record_id: image.scene for image in plan.images}
    for record in captions:
        text = record["conversations"][1]["value"]
        for obj in by_id[record["id"]].objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in text
    # without captions the plan is unchanged by the feature (same records as before it existed)
    assert plan_train(SMALL).captions == 0
