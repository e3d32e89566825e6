"""`vir-export`: a LoRA run as transformers' `LlavaForConditionalGeneration`, loaded by plain transformers with
`vir` unimportable (tests/hf_export_driver.py): same prompt ids as training's template, same pixels, logits
within 1e-4 in fp32, the same greedy answers on the synthetic test split and on images the project never saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from export_parity import assert_export_computes_the_run, assert_tokenizer_files_read_by_transformers_4
from training_fixtures import lora_run

from vir.data.conversation import Message
from vir.data.templates import build_generation_prompt
from vir.inference.evaluate import evaluate, load_eval_items
from vir.models.checkpoint import load_run

DRIVER = Path(__file__).with_name("hf_export_driver.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return lora_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    done = subprocess.run([sys.executable, "-m", "vir.cli.export", str(run.output_dir), str(out),
                           "--max-shard-size", "200KB"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _odd_images(root: Path) -> list[Path]:
    """Images the project never made: odd sizes, greyscale, RGBA, a JPEG."""
    rng = np.random.default_rng(3)
    paths = []
    for name, mode, size in (("odd.png", "RGB", (37, 53)), ("grey.png", "L", (64, 20)),
                             ("alpha.png", "RGBA", (30, 30)), ("photo.jpg", "RGB", (90, 61))):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").convert(mode).save(root / name)
        paths.append(root / name)
    return paths


def _hf(exported: Path, cases: list[dict], tmp_path: Path) -> dict:
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    out = tmp_path / "hf.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(DRIVER), str(exported), str(tmp_path / "cases.json"), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_the_export_is_plain_transformers_with_sharded_safetensors_and_a_card(exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["image_seq_length"] == 16 and config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default" and config["projector_hidden_act"] == "gelu"
    shards = sorted(exported.glob("model-*.safetensors"))
    assert len(shards) > 1 and (exported / "model.safetensors.index.json").is_file()
    assert not list(exported.glob("*.bin")) and "trust_remote_code" not in json.dumps(config)
    processor = json.loads((exported / "processor_config.json").read_text())
    assert processor["num_additional_image_tokens"] == 1 and processor["patch_size"] == 8
    for image in (processor["image_processor"], json.loads((exported / "preprocessor_config.json").read_text())):
        assert image["do_pad"] is True and image["image_processor_type"] == "LlavaImageProcessor"
    card = (exported / "README.md").read_text()
    assert "LoRA adapter is merged" in card and "do_pad" in card and "training.mode" not in card
    assert "mode: stage2_lora" in card and "Checked with transformers 4.57.6 and 5.24" in card


def test_plain_transformers_computes_what_the_run_computes(run, exported, tmp_path):
    model, tokenizer, processor, run_config = load_run(run.output_dir, merge_adapter=True, device="cpu")
    data = run.cfg.data
    items = load_eval_items(data.test_path or data.eval_path, data.image_folder)
    test_images = [item.query.images for item in items]
    odd = _odd_images(tmp_path)
    cases = [{"name": f"test{k}", "images": [str(Path(data.image_folder) / p) for p in item_paths],
              "question": item.query.messages[-1].content.replace("<image>", "").strip()}
             for k, (item, item_paths) in enumerate(zip(items, [_paths(data, i) for i in range(len(items))]))]
    cases += [{"name": f"odd_{p.stem}", "images": [str(p)], "question": "What is in the picture?"} for p in odd]
    cases += [{"name": "two_images", "images": [str(odd[0]), str(odd[1])], "question": "Which is brighter?"},
              {"name": "text_only", "images": [], "question": "What is two plus two?"}]
    hf = _hf(exported, cases, tmp_path)
    assert hf["image_processor"] == "LlavaImageProcessorPil"

    stops = json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
    assert_export_computes_the_run(model, tokenizer, processor, run_config.data.image_aspect_ratio, "llama3", cases,
                                   hf, stops)

    # What a user types: `vir-chat RUN --image X --prompt Q` answers what plain transformers answers on the export.
    for case in [c for c in cases if c["name"].startswith("odd_")]:
        chat = subprocess.run([sys.executable, "-m", "vir.cli.chat", str(run.output_dir), "--image", case["images"][0],
                               "--prompt", case["question"], "--max-new-tokens", "8"],
                              capture_output=True, text=True, timeout=300)
        assert chat.returncode == 0, chat.stderr[-2000:]
        assert chat.stdout.strip() == hf[case["name"]]["answer"], case["name"]

    # The synthetic test split: the export's answers are vir-eval's, so its accuracy is too.
    ours = evaluate(model, tokenizer, processor, items, max_new_tokens=8, progress=False)
    assert [row["prediction"] for row in ours.predictions] == [hf[f"test{k}"]["answer"] for k in range(len(items))]
    assert len(test_images) == len(items)


@pytest.mark.parametrize("kind", ["stage1", "full"])
def test_stage1_and_full_runs_export_too(kind, tmp_path_factory, tmp_path):
    from training_fixtures import full_run, mixed_batch, stage1_run, tiny_bases
    from transformers import LlavaForConditionalGeneration

    run = {"stage1": stage1_run, "full": full_run}[kind](tmp_path_factory)
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "vir.cli.export", str(run.output_dir), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    model, tokenizer, processor, run_config = load_run(run.output_dir, device="cpu")
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    batch = mixed_batch(tiny_bases(tmp_path_factory), tokenizer, processor, model.config.num_image_tokens)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        assert (model(**inputs).logits - hf(**inputs).logits).abs().max() < 1e-4
    from transformers import AutoProcessor

    hf_processor = AutoProcessor.from_pretrained(str(out))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    rendered = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    expanded = rendered.replace("<image>", "<image>" * model.config.num_image_tokens)
    ids = tokenizer(expanded, add_special_tokens=False)["input_ids"]
    ours = build_generation_prompt([Message("user", "<image>\nDescribe it.")], tokenizer, run_config.data.template,
                                   model.config.image_token_id, model.config.num_image_tokens)
    assert ids == ours, (run_config.data.template, rendered)


def _paths(data, index: int) -> list[str]:
    record = json.loads(Path(data.test_path or data.eval_path).read_text())[index]
    image = record.get("image")
    return [] if image is None else [image] if isinstance(image, str) else list(image)


def test_the_export_is_written_in_the_form_transformers_4_reads(run, exported):
    """The files serving stacks pinned to transformers 4.x (and tokenizers before 0.20) read: checked as files here;
    transformers 5 reads the same files in the parity tests above."""
    from safetensors import safe_open

    assert_tokenizer_files_read_by_transformers_4(exported)
    text_config = json.loads((exported / "config.json").read_text())["text_config"]
    assert text_config["rope_theta"] == text_config["rope_parameters"]["rope_theta"]
    assert text_config["rope_theta"] == run.model.config.rope_parameters["rope_theta"]
    keys = set()
    for shard in exported.glob("model*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            keys |= set(handle.keys())
    tower = [key for key in keys if "vision_tower" in key]
    assert tower and all(key.startswith("vision_tower.vision_model.") for key in tower)
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == keys
