"""Each LLM family, with its tower and its chat template, through the whole recipe once: stage 1 (projector on
captions, `plain`) -> stage 2 (LoRA on conversations, the family's template, from stage 1's projector) ->
`vir-chat` -> `vir-export` -> plain transformers (`LlavaForConditionalGeneration`, `vir` unimportable) computing
what the run computes: the same prompt ids from the exported chat template, logits within 1e-4, the same greedy
answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export_parity import assert_export_computes_the_run
from family_models import FAMILY_CASES, family_llm_dir, tower_dir
from training_fixtures import Bases, run_overrides, synthetic_data
from vir.cli import chat as chat_cli
from vir.data.conversation import Message
from vir.data.images import open_user_image, preprocess_images
from vir.data.templates import build_generation_prompt, generation_stop_ids, get_template
from vir.export.hf_llava import export_hf_llava
from vir.models.checkpoint import load_run
from vir.training.run import run_training
from vir.utils.config import compose_config

DRIVER = Path(__file__).with_name("hf_export_driver.py")
FAMILIES = sorted(FAMILY_CASES)
QUESTION = "How many red objects are there?"
# Keys the family runs set themselves (run_overrides pins the Llama-3 demo's).
_REPLACED = ("data.template=", "training.max_steps=", "training.num_train_epochs=")


def _overrides(factory, name: str, output_dir: Path, mode: str, *extra: str) -> list:
    case = FAMILY_CASES[name]
    bases = Bases(synthetic_data(factory), family_llm_dir(factory, name), tower_dir(factory, case.tower))
    pinned = [o for o in run_overrides(bases, output_dir, mode) if not o.startswith(_REPLACED)]
    return [*pinned, "training.max_steps=2", "training.num_train_epochs=1", *extra]


def _image(factory) -> str:
    data = synthetic_data(factory)
    record = json.loads(Path(data.test).read_text())[0]
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    return str(Path(data.root) / images[0])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """name -> {"run", "export", "chat", "hf"}: both stages, vir-chat and the export of every family, then one
    plain-transformers process reading every export."""
    root = tmp_path_factory.mktemp("families")
    image = _image(tmp_path_factory)
    cases = [{"name": "image", "images": [image], "question": QUESTION},
             {"name": "text_only", "images": [], "question": "What is two plus two?"}]
    (root / "cases.json").write_text(json.dumps(cases))
    results, driver_args = {}, []
    for name in FAMILIES:
        stage1 = root / name / "stage1"
        run_training(compose_config(_overrides(tmp_path_factory, name, stage1, "stage1", "data.template=plain")))
        stage2 = root / name / "stage2"
        run_training(compose_config(_overrides(
            tmp_path_factory, name, stage2, "stage2_lora", f"data.template={FAMILY_CASES[name].template}",
            f"model.pretrained_projector={stage1 / 'mm_projector.bin'}")))
        export = export_hf_llava(stage2, root / name / "hf")
        results[name] = {"run": stage2, "export": export, "hf_file": root / name / "hf.pt"}
        driver_args += [str(export), str(root / "cases.json"), str(root / name / "hf.pt")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(DRIVER), *driver_args], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, result in results.items():
        result["hf"] = torch.load(result["hf_file"], weights_only=False)
    return results, cases


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_exports_what_its_run_computes(name, pipeline, capsys):
    results, cases = pipeline
    result, case = results[name], FAMILY_CASES[name]
    config = json.loads((result["export"] / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["text_config"]["model_type"] == case.model_type
    assert config["vision_config"]["model_type"] == f"{case.tower}_vision_model"
    assert config["vision_feature_select_strategy"] == ("default" if case.tower == "clip" else "full")
    assert config["image_seq_length"] == 4

    model, tokenizer, processor, run_config = load_run(result["run"], merge_adapter=True, device="cpu")
    assert run_config.data.template == case.template
    # The export stops where the run's chat stops: at the template's end-of-turn token (`<|im_end|>`,
    # `<end_of_turn>`, Phi-3's `<|end|>`, ...) and at eos.
    stops = json.loads((result["export"] / "generation_config.json").read_text())["eos_token_id"]
    assert stops == generation_stop_ids(case.template, tokenizer, model.generation_config)
    end_of_turn = {tokenizer.convert_tokens_to_ids(t) for t in get_template(case.template).stop_tokens(tokenizer)}
    assert end_of_turn and end_of_turn <= set(stops)
    assert tokenizer.eos_token_id in stops
    softcap = getattr(model.config, "final_logit_softcapping", None)  # transformers' Llava does not cap (module doc)
    assert_export_computes_the_run(model, tokenizer, processor, run_config.data.image_aspect_ratio, case.template,
                                   cases, result["hf"], stops, softcap)

    # What a user types: `vir-chat RUN --image X --prompt Q` answers what plain transformers answers on the export.
    capsys.readouterr()
    chat_cli.main([str(result["run"]), "--image", cases[0]["images"][0], "--prompt", QUESTION,
                   "--max-new-tokens", "8"])
    assert capsys.readouterr().out.strip() == result["hf"]["image"]["answer"]


@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_vir_merge_keeps_tied_embeddings_one_weight(name, pipeline, tmp_path):
    """A LoRA run of a tied-embedding family merged into full weights (`vir-merge`): still tied, same logits."""
    from vir.export.merge import merge_run

    results, cases = pipeline
    run = results[name]["run"]
    merged_dir = merge_run(run, tmp_path / "merged")
    merged, tokenizer, processor, run_config = load_run(merged_dir, device="cpu")
    model, _, _, _ = load_run(run, merge_adapter=True, device="cpu")
    assert merged.config.tie_word_embeddings
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    images = [open_user_image(cases[0]["images"][0])]
    ids = build_generation_prompt([Message("user", "<image>\n" + QUESTION)], tokenizer, FAMILY_CASES[name].template,
                                  merged.config.image_token_id, merged.config.num_image_tokens)
    pixels = preprocess_images(images, processor, run_config.data.image_aspect_ratio)
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits
        assert (merged(input_ids=torch.tensor([ids]), pixel_values=pixels).logits - expected).abs().max() < 1e-5


def test_llavas_own_format_is_refused_for_what_llavas_loader_cannot_build(pipeline, tmp_path):
    """`vir-export --format llava` writes what LLaVA's `load_pretrained_model` loads: Llama or Mistral with CLIP.
    A Qwen2 + SigLIP run is refused in one line pointing at the transformers export."""
    from vir.export.merge import export_llava_original
    from vir.utils.errors import UserError

    results, _ = pipeline
    with pytest.raises(UserError, match=r"is a llava_qwen2 model with a siglip_vision_model tower; LLaVA's own loader "
                                        r"builds only llava_llama or llava_mistral with a CLIP tower: export it with "
                                        r"--format hf"):
        export_llava_original(results["qwen2"]["run"], tmp_path / "llava")
    assert not (tmp_path / "llava").exists()
