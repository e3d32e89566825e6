"""`vir-merge` (one stand-alone checkpoint), `vir-export --format llava` (LLaVA's own layout) and
`vir-export --no-merge` (base + adapter): each computes what the run computes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from export_parity import assert_tokenizer_files_read_by_transformers_4
from family_tokenizers import FAMILIES, FAMILY_TEMPLATES, family_tokenizer
from training_fixtures import full_run, lora_run, mixed_batch, stage1_run, tiny_bases

from vir.data.conversation import Message
from vir.data.templates import build_generation_prompt
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


def test_the_llava_layout_is_what_llavas_loader_reads_from_a_moved_copy(tmp_path_factory, tmp_path):
    """`--format llava`: LLaVA's config keys and files, in the forms transformers 4.36 / tokenizers 0.15 read, a
    tower reference that resolves wherever the directory goes, and the README's prompt giving training's ids.
    `make interop-check` loads it with LLaVA's own code."""
    from transformers import AutoTokenizer

    run = lora_run(tmp_path_factory)
    exported, out = tmp_path / "llava-exported", tmp_path / "elsewhere" / "llava-moved"
    _cli("vir.cli.export", str(run.output_dir), str(exported), "--format", "llava")
    out.parent.mkdir()
    exported.rename(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_llama" and config["architectures"] == ["LlavaLlamaForCausalLM"]
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    assert config["mm_vision_select_feature"] == "patch" and config["mm_hidden_size"] == 32
    assert config["image_aspect_ratio"] == "pad" and config["mm_use_im_start_end"] is False
    assert config["mm_use_im_patch_token"] is False  # LLaVA's loader would add <im_patch> and resize otherwise
    assert config["mm_vision_tower"] == "vision_tower" and (out / config["mm_vision_tower"]).is_dir()
    assert config["rope_theta"] == run.model.config.rope_parameters["rope_theta"]  # 4.x reads only rope_theta
    assert json.loads((out / "vision_tower" / "config.json").read_text())["model_type"] == "clip_vision_model"
    tower_keys = set(load_file(str(out / "vision_tower" / "model.safetensors")))
    assert tower_keys and all(key.startswith("vision_model.") for key in tower_keys)  # CLIPVisionModel 4.x's names
    assert (out / "vision_tower" / "preprocessor_config.json").is_file()
    assert_tokenizer_files_read_by_transformers_4(out)
    keys = set(load_file(str(out / "model.safetensors")))
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.bias", "lm_head.weight",
            "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"} <= keys
    assert not any("lora" in k or "base_layer" in k for k in keys)
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    assert sorted(projector) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                                 "model.mm_projector.2.bias", "model.mm_projector.2.weight"]

    readme = (out / "README.md").read_text()
    assert "mm_vision_tower=os.path.join(path, 'vision_tower')" in readme and "IMAGE_TOKEN_INDEX if i" in readme
    assert "composites transparent images" in readme and "transformers 4.36.2" in readme
    assert "load_pretrained_model(path, None, 'llava-exported'," in readme  # the final name, not the staging one
    # The README's prompt: the chat template's ids are training's, one image token per image.
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat colour?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt).input_ids
    image_id, n = run.model.config.image_token_id, run.model.config.num_image_tokens
    trained = build_generation_prompt([Message("user", "<image>\nWhat colour?")], tokenizer, "llama3", image_id, n)
    assert [t for i in ids for t in ([image_id] * n if i == image_id else [i])] == trained


@pytest.mark.parametrize("family", FAMILIES)
def test_the_llava_layouts_prompt_recipe_gives_training_ids_for_every_family(family, tmp_path):
    """The tokenizer `--format llava` ships (the training chat template; a bos added only where it writes none),
    saved in the portable form and read back: the README's prompt, rendered and then tokenized, gives training's
    ids, one image token per image, for each family's tokenizer and template."""
    from transformers import AutoTokenizer

    from vir.export.chat_template import chat_template_for, drop_implicit_bos
    from vir.export.portable import write_portable_tokenizer
    from vir.models.builder import prepare_tokenizer

    tokenizer = prepare_tokenizer(family_tokenizer(family, tmp_path / "source"))  # a fresh copy: it is changed
    template = FAMILY_TEMPLATES[family]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    tokenizer.chat_template = chat_template_for(template, tokenizer)
    drop_implicit_bos(tokenizer, template, image_id, 1, tokenizer.chat_template)
    tokenizer.save_pretrained(str(tmp_path))
    write_portable_tokenizer(tmp_path)
    backend = json.loads((tmp_path / "tokenizer.json").read_text())
    for part in (backend["pre_tokenizer"], backend["decoder"]):  # tokenizers 0.15 requires add_prefix_space
        assert part is None or part["type"] != "Metaspace" or "add_prefix_space" in part
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("<image>\nWhat colour?", "<image>\n<image>\nDescribe the pictures.", "No image here.",
                 "<image>\nIs it  left of the cat?"):
        prompt = reloaded.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                              add_generation_prompt=True)
        expected = build_generation_prompt([Message("user", text)], tokenizer, template, image_id, 1)
        assert reloaded(prompt).input_ids == expected, text


def test_the_llava_layout_names_a_hub_tower_only_for_an_untrained_one(tmp_path_factory, tmp_path):
    from vir.export.merge import export_llava_original
    from vir.utils.errors import UserError

    out = export_llava_original(lora_run(tmp_path_factory).output_dir, tmp_path / "llava",
                                vision_tower_id="openai/clip-vit-large-patch14-336")
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    assert "`openai/clip-vit-large-patch14-336`, the hub checkpoint" in (out / "README.md").read_text()
    with pytest.raises(UserError, match="trained its vision tower"):
        export_llava_original(full_run(tmp_path_factory).output_dir, tmp_path / "full",
                              vision_tower_id="openai/clip-vit-large-patch14-336")
    assert not (tmp_path / "full").exists()
    with pytest.raises(FileNotFoundError, match="nope is not a vir run directory: vir_config.yaml is missing"):
        export_llava_original(tmp_path / "nope", tmp_path / "from_nothing")  # said as for every format
    assert not (tmp_path / "from_nothing").exists()


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
