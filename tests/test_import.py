"""The way in: transformers Llava directories (`model.init_from_hf`, both key layouts), LLaVA's original
checkpoints (`model.llm.path` at a llava_llama directory) and LoRA runs' `non_lora_trainables.bin`
(`model.pretrained_projector`): each imports exactly (logits equal), and a mismatch names keys and shapes."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_fixtures import lora_run, mixed_batch, run_config, run_overrides, tiny_bases, train
from transformers import LlavaForConditionalGeneration

from vir.models.builder import build_all
from vir.models.checkpoint import load_run
from vir.models.hf_import import ImportMismatchError, apply_init_from_hf
from vir.models.projector import projector_state_dict
from vir.utils.config import compose_config


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return tiny_bases(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers Llava directory (transformers >= 4.52 key layout), made by exporting a trained run."""
    run = lora_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("hf") / "llava"
    done = subprocess.run([sys.executable, "-m", "vir.cli.export", str(run.output_dir), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _init_config(bases, hf, output_dir, *extra):
    overrides = [o for o in run_overrides(bases, output_dir, "stage2_lora")
                 if not o.startswith(("model.llm.path=", "model.vision_tower.path="))]
    return compose_config([*overrides, "model.llm.path=null", "model.vision_tower.path=null",
                           f"model.init_from_hf={hf}", *extra])


def _logits_match(ours, hf, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return float((ours(**inputs).logits - hf(**inputs).logits).abs().max())


def _rewritten(hf_dir, target, rename):
    """A copy of the checkpoint with every weight key passed through `rename`, in one safetensors file."""
    shutil.copytree(hf_dir, target)
    state = {}
    for file in sorted(target.glob("model*.safetensors")):
        state.update(load_file(str(file)))
        file.unlink()
    (target / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file({rename(k): v for k, v in state.items()}, str(target / "model.safetensors"))
    return target


def _unnested_key(key: str) -> str:
    """The export's key (the hub's llava-hf layout, `vision_tower.vision_model.*`) -> what transformers 5's own
    `save_pretrained` writes (`vision_tower.*`)."""
    return key.replace("vision_tower.vision_model.", "vision_tower.", 1)


def _module_key(key: str) -> str:
    """transformers' serialised key -> the module's own name (`model.language_model.*`, ...)."""
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + key


LAYOUTS = {"export (hub)": None, "transformers 5": _unnested_key, "module": _module_key}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_init_from_hf_builds_the_same_model(bases, hf_dir, tmp_path, layout):
    source = hf_dir if LAYOUTS[layout] is None else _rewritten(hf_dir, tmp_path / layout, LAYOUTS[layout])
    cfg = _init_config(bases, source, tmp_path / "run")
    apply_init_from_hf(cfg)
    assert cfg.model.llm.path == str(tmp_path / "run" / "init_from_hf" / "llm")
    assert cfg.model.vision_tower.select_layer == -2 and cfg.model.vision_tower.select_feature == "patch"
    ours, tokenizer, processor = build_all(cfg)
    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    batch = mixed_batch(bases, tokenizer, processor, ours.config.num_image_tokens)
    assert _logits_match(ours.eval(), hf, batch) < 1e-5
    # An unchanged source is not imported again.
    stamp = (tmp_path / "run" / "init_from_hf" / "llm" / "model.safetensors").stat().st_mtime_ns
    apply_init_from_hf(_init_config(bases, source, tmp_path / "run"))
    assert (tmp_path / "run" / "init_from_hf" / "llm" / "model.safetensors").stat().st_mtime_ns == stamp


def test_vir_train_continues_an_hf_checkpoint_and_exports_it_back(bases, hf_dir, tmp_path):
    cfg = _init_config(bases, hf_dir, tmp_path / "run", "training.max_steps=2", "training.learning_rate=0")
    run = train(cfg)
    assert run.outcome.global_step == 2
    # lr 0: the run is the imported model; exported again, it is the source checkpoint.
    out = tmp_path / "again"
    done = subprocess.run([sys.executable, "-m", "vir.cli.export", str(run.output_dir), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    again = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    source = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    model, tokenizer, processor, _ = load_run(run.output_dir, device="cpu")
    batch = mixed_batch(bases, tokenizer, processor, model.config.num_image_tokens)
    assert _logits_match(again, source, batch) < 1e-5


def test_a_mismatched_hf_checkpoint_names_keys_and_shapes(bases, hf_dir, tmp_path):
    dropped = _rewritten(hf_dir, tmp_path / "dropped", lambda k: "x." + k if k.endswith("model.norm.weight") else k)
    with pytest.raises(ImportMismatchError, match=r"keys that are no part of a Llava model: \['x.language_model"):
        apply_init_from_hf(_init_config(bases, dropped, tmp_path / "run"))
    state = {}
    for file in sorted(hf_dir.glob("model*.safetensors")):
        state.update(load_file(str(file)))
    missing = tmp_path / "missing"
    _rewritten(hf_dir, missing, lambda k: k)
    save_file({k: v for k, v in state.items() if not k.endswith("model.norm.weight")},
              str(missing / "model.safetensors"))
    with pytest.raises(ImportMismatchError,
                       match=r"language model weights do not match .*missing \['model.norm.weight'\]"):
        apply_init_from_hf(_init_config(bases, missing, tmp_path / "run2"))
    state["multi_modal_projector.linear_2.weight"] = torch.zeros(32, 16)
    save_file(state, str(missing / "model.safetensors"))
    with pytest.raises(ImportMismatchError, match=r"projector weights .*wrong shapes \{'model.mm_projector.2.weight': "
                                                  r"\{'expected': \(32, 32\), 'found': \(32, 16\)\}"):
        apply_init_from_hf(_init_config(bases, missing, tmp_path / "run3"))


def test_init_from_hf_refuses_explicit_bases_beside_it(bases, hf_dir, tmp_path):
    cfg = compose_config([*run_overrides(bases, tmp_path / "run", "stage2_lora"), f"model.init_from_hf={hf_dir}"])
    with pytest.raises(Exception, match="leave model.llm.path, model.vision_tower.path unset"):
        apply_init_from_hf(cfg)


def test_an_original_llava_checkpoint_loads_as_model_llm_path(bases, tmp_path_factory, tmp_path, caplog):
    """LLaVA's own full checkpoint: config.json with model_type llava_llama and its mm_* fields but no vision
    config (the tower is named by mm_vision_tower, a hub id), weights without the tower."""
    run = lora_run(tmp_path_factory)
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "-m", "vir.cli.merge", str(run.output_dir), str(merged)], check=True,
                   capture_output=True, timeout=300)
    original = tmp_path / "llava-v1.5"
    original.mkdir()
    config = json.loads((merged / "config.json").read_text())
    for key in ("vision_config", "num_image_tokens", "image_token", "image_token_id"):
        config.pop(key, None)
    config.update(mm_vision_tower="openai/clip-vit-large-patch14-336", mm_use_im_patch_token=False,
                  architectures=["LlavaLlamaForCausalLM"])
    (original / "config.json").write_text(json.dumps(config))
    weights = {k: v for k, v in load_file(str(merged / "model.safetensors")).items()
               if not k.startswith("model.vision_tower.")}
    save_file(weights, str(original / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(merged / name, original / name)

    cfg = run_config(bases, tmp_path / "run", "stage2_lora", f"model.llm.path={original}")
    with caplog.at_level(logging.WARNING, logger="vir.models.configuration"):
        ours, tokenizer, processor = build_all(cfg)
    # Its mm_hidden_size is the tower's (model.vision_tower.path), not CLIP-L's: no warning that it disagrees.
    assert ours.config.mm_hidden_size == config["mm_hidden_size"] != 1024
    assert not [r for r in caplog.records if "disagrees" in r.getMessage()]
    reference, *_ = load_run(merged, device="cpu")
    batch = mixed_batch(bases, tokenizer, processor, ours.config.num_image_tokens)
    assert _logits_match(ours.eval(), reference, batch) < 1e-5


def test_a_llava_lora_runs_non_lora_trainables_is_a_pretrained_projector(bases, tmp_path_factory, tmp_path):
    run = lora_run(tmp_path_factory)
    projector = projector_state_dict(run.model)
    path = tmp_path / "non_lora_trainables.bin"
    torch.save({"base_model.model." + k: v for k, v in projector.items()}, path)
    started = train(run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=1",
                               f"model.pretrained_projector={path}"))
    assert all(torch.equal(started.initial_projector[k], v) for k, v in projector.items())


def test_an_original_llava_checkpoint_without_a_local_tower_says_which_key_to_set(bases, tmp_path):
    original = tmp_path / "llava"
    original.mkdir()
    shutil.copytree(bases.llm, original, dirs_exist_ok=True)
    config = json.loads((original / "config.json").read_text())
    config.update(model_type="llava_llama", mm_vision_tower="openai/clip-vit-large-patch14-336",
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=1024)
    (original / "config.json").write_text(json.dumps(config))
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", f"model.llm.path={original}",
                     "model.vision_tower.path=null")
    with pytest.raises(Exception, match=r"original LLaVA checkpoint: its tower is named "
                                        r"'openai/clip-vit-large-patch14-336' .*set model.vision_tower.path"):
        build_all(cfg)
