"""`vir-merge` (one stand-alone checkpoint), `vir-export --format llava` (LLaVA's own layout) and
`vir-export --no-merge` (base + adapter): each computes what the run computes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_fixtures import full_run, lora_run, mixed_batch, stage1_run, tiny_bases

from vir.inference.evaluate import evaluate_run
from vir.models.checkpoint import load_run
from vir.models.llava_arch import LlavaLlamaForCausalLM


def _cli(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


RUNS = {"lora": lora_run, "stage1": stage1_run, "full": full_run}


@pytest.mark.parametrize("kind", sorted(RUNS))
def test_a_merged_run_computes_what_the_run_computes_and_needs_no_bases(kind, tmp_path_factory, tmp_path):
    run = RUNS[kind](tmp_path_factory)
    out = tmp_path / "merged"
    _cli("vir.cli.merge", str(run.output_dir), str(out))
    assert (out / "model.safetensors").is_file() and (out / "mm_projector.bin").is_file()
    assert not (out / "adapter_config.json").exists()

    original, tokenizer, processor, _ = load_run(run.output_dir, device="cpu")
    merged, *_ = load_run(out, device="cpu")
    assert isinstance(merged, LlavaLlamaForCausalLM)
    batch = mixed_batch(tiny_bases(tmp_path_factory), tokenizer, processor, merged.config.num_image_tokens)
    assert (_logits(merged, batch) - _logits(original, batch)).abs().max() < 1e-5


def test_vir_eval_and_vir_chat_on_a_merged_run_answer_as_on_the_run(tmp_path_factory, tmp_path):
    run = lora_run(tmp_path_factory)
    out = tmp_path / "merged"
    _cli("vir.cli.merge", str(run.output_dir), str(out))
    theirs = evaluate_run(run.output_dir, split="eval", limit=6, max_new_tokens=6)
    ours = evaluate_run(out, split="eval", limit=6, max_new_tokens=6)
    assert ours["accuracy"] == theirs["accuracy"]
    predictions = [(out / "predictions_eval.jsonl"), (run.output_dir / "predictions_eval.jsonl")]
    rows = [[json.loads(line)["prediction"] for line in p.read_text().splitlines()] for p in predictions]
    assert rows[0] == rows[1]

    image = tmp_path / "odd.png"
    Image.new("RGB", (45, 23), (200, 30, 30)).save(image)
    answers = [_cli("vir.cli.chat", str(d), "--image", str(image), "--prompt", "What colour?",
                    "--max-new-tokens", "6").stdout for d in (run.output_dir, out)]
    assert answers[0] == answers[1] and answers[0].strip()


def test_the_llava_layout_has_llavas_config_keys_and_files(tmp_path_factory, tmp_path):
    run = lora_run(tmp_path_factory)
    out = tmp_path / "llava"
    _cli("vir.cli.export", str(run.output_dir), str(out), "--format", "llava")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert config["mm_vision_select_feature"] == "patch" and config["mm_hidden_size"] == 32
    assert config["image_aspect_ratio"] == "pad" and config["mm_use_im_start_end"] is False
    assert Path(config["mm_vision_tower"]) == (out / "vision_tower").resolve()
    assert json.loads((out / "vision_tower" / "config.json").read_text())["model_type"] == "clip_vision_model"
    keys = set(load_file(str(out / "model.safetensors")))
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight",
            "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} <= keys
    assert not any("lora" in k or "base_layer" in k for k in keys)
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                 "model.mm_projector.2.bias", "model.mm_projector.2.weight"]


def test_no_merge_keeps_the_adapter_apart_and_base_plus_adapter_is_the_merged_model(tmp_path_factory, tmp_path):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    run = lora_run(tmp_path_factory)
    merged_dir, split_dir = tmp_path / "merged", tmp_path / "split"
    _cli("vir.cli.export", str(run.output_dir), str(merged_dir))
    _cli("vir.cli.export", str(run.output_dir), str(split_dir), "--no-merge")
    assert (split_dir / "adapter" / "adapter_config.json").is_file()
    assert "not merged" in (split_dir / "README.md").read_text()
    merged = LlavaForConditionalGeneration.from_pretrained(str(merged_dir)).eval()
    base = LlavaForConditionalGeneration.from_pretrained(str(split_dir))
    adapted = PeftModel.from_pretrained(base, str(split_dir / "adapter")).eval()
    ids = torch.tensor([[501, 12, 40, 7, 9]])
    with torch.no_grad():
        assert (adapted(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() < 1e-5
        plain = LlavaForConditionalGeneration.from_pretrained(str(split_dir)).eval()
        assert (plain(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() > 1e-6  # LoRA matters
