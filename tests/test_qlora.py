"""QLoRA on the CPU (bitsandbytes' CPU backend): which modules are 4-bit, a falling loss, the artifacts, the reload,
`vir-eval` and `vir-chat` on the saved run."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from training_fixtures import LLM_SIZES, run_config, tiny_bases, train
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

pytest.importorskip("bitsandbytes")

from vir.cli.chat import ChatSession  # noqa: E402
from vir.export.hf_llava import export_hf_llava  # noqa: E402
from vir.export.merge import merge_run  # noqa: E402
from vir.inference.evaluate import evaluate_run, load_eval_items  # noqa: E402
from vir.models.builder import build_all  # noqa: E402
from vir.models.checkpoint import load_run  # noqa: E402
from vir.models.quantization import is_quantized  # noqa: E402
from vir.training.modes import apply_training_mode  # noqa: E402

STEPS = 24
QLORA = ("model.llm.quantization=nf4", "model.llm.dtype=bfloat16")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The tiny bases with an LLM of hidden 64: bitsandbytes' CPU inference path packs 4-bit weights in blocks
    of 64 input features (a real LLM has thousands), so the tests' usual hidden 32 cannot run eval there."""
    tiny = tiny_bases(tmp_path_factory)
    llm_dir = tmp_path_factory.mktemp("base_llm_64")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny.llm))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), initializer_range=0.1,
                         **{**LLM_SIZES, "hidden_size": 64, "intermediate_size": 128})
    LlamaForCausalLM(config).save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    return dataclasses.replace(tiny, llm=llm_dir)


def _linear_kinds(model) -> dict:
    return {name: type(module).__name__ for name, module in model.named_modules()
            if type(module).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")}


def test_nf4_quantizes_the_llm_layers_only_and_the_projector_has_real_values(bases, tmp_path):
    model, _, _ = build_all(run_config(bases, tmp_path, "stage2_lora", *QLORA))
    assert is_quantized(model)
    kinds = _linear_kinds(model)
    llm = {n: k for n, k in kinds.items() if n.startswith("model.layers.")}
    assert llm and set(llm.values()) == {"Linear4bit"}
    assert {k for n, k in kinds.items() if n.startswith(("model.vision_tower.", "model.mm_projector."))} == {"Linear"}
    assert kinds["lm_head"] == "Linear"
    for name, tensor in model.get_model().mm_projector.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        if name.endswith("weight"):
            assert tensor.abs().sum() > 0, name


@pytest.mark.parametrize("dtype, frozen", [("bfloat16", torch.bfloat16), ("float16", torch.float32)])
def test_qlora_keeps_frozen_weights_and_the_residual_stream_in_bf16(bases, tmp_path, dtype, frozen):
    """In bf16 the frozen weights stay bf16 (peft's fp32 upcast would cost Llama-3-8B ~2.7 GB and make every
    checkpointed activation fp32); in fp16 peft's upcast still runs. LoRA and the projector train in fp32."""
    cfg = run_config(bases, tmp_path, "stage2_lora", "model.llm.quantization=nf4", f"model.llm.dtype={dtype}")
    model, _, _ = build_all(cfg)
    model = apply_training_mode(model, cfg.training)
    base = model.get_base_model()
    for module in (base.get_input_embeddings(), base.lm_head, base.model.norm, base.get_vision_tower()):
        assert {p.dtype for p in module.parameters()} == {frozen}
        assert not any(p.requires_grad for p in module.parameters())
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}
    assert any("lora_A" in n for n in trained) and any("mm_projector" in n for n in trained)
    streams = []
    base.model.layers[-1].register_forward_hook(lambda module, args, out: streams.append(out))
    ids = torch.tensor([[base.config.bos_token_id, 5, 6, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    stream = streams[0][0] if isinstance(streams[0], tuple) else streams[0]
    assert stream.dtype == frozen


def test_quantized_llm_refuses_modes_other_than_lora(bases, tmp_path):
    cfg = run_config(bases, tmp_path, "stage2_full", *QLORA)
    model, _, _ = build_all(cfg)
    with pytest.raises(ValueError, match="training.mode=stage2_lora"):
        apply_training_mode(model, cfg.training)


def test_quantization_needs_a_checkpoint(bases, tmp_path):
    cfg = run_config(bases, tmp_path, "stage2_lora", *QLORA, "model.llm.path=null")
    with pytest.raises(ValueError, match="model.llm.path"):
        build_all(cfg)


@pytest.mark.slow
def test_qlora_trains_saves_and_reloads_for_eval_and_chat(bases, tmp_path):
    data = bases.data
    cfg = run_config(bases, tmp_path / "run", "stage2_lora", *QLORA, f"training.max_steps={STEPS}",
                     f"training.save_steps={STEPS}", "training.learning_rate=2e-2", "training.mm_projector_lr=2e-2",
                     f"data.test_path={data.test}")
    run = train(cfg)
    losses = [row["loss"] for row in run.outcome.log_history if "loss" in row]
    assert len(losses) == STEPS and statistics.mean(losses[-3:]) < losses[0] - 0.3, losses

    out = run.output_dir
    for name in ("adapter_model.safetensors", "adapter_config.json", "mm_projector.bin", "vir_config.yaml"):
        assert (out / name).is_file(), name
    projector = torch.load(out / "mm_projector.bin", weights_only=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in projector.values())
    assert json.loads((out / "adapter_config.json").read_text())["r"] == cfg.training.lora_r

    # The saved run reloads quantized, with the trained adapter and projector: the same logits as at the end.
    model, tokenizer, processor, run_cfg = load_run(out)
    assert is_quantized(model) and run_cfg.model.llm.quantization == "nf4"
    trained = run.model
    trained.eval()
    ids = tokenizer("<|begin_of_text|>user text", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        reloaded, live = model(input_ids=ids).logits.float(), trained(input_ids=ids).logits.float()
    # bf16 compute over logits of magnitude ~6: a few of 3078 differ by up to ~0.04, the mean by ~0.005
    torch.testing.assert_close(reloaded, live, atol=5e-2, rtol=2e-2)
    assert float((reloaded - live).abs().mean()) < 1e-2

    metrics = evaluate_run(out, split="test", limit=4, max_new_tokens=3, batch_size=4)
    assert metrics["n"] == 4 and set(metrics["per_type"]) <= {"count", "exists", "attribute", "relation"}
    item = load_eval_items(data.test, data.root)[0]
    session = ChatSession(model, tokenizer, processor, run_cfg, max_new_tokens=3)
    session.reset(item.query.images[:1])
    assert isinstance(session.ask("How many objects are there?"), str)

    # Merged and exported: LoRA folds into the de-quantised base (the values the 4-bit matmuls used), and says so.
    merged_dir, hf_dir = merge_run(out, tmp_path / "merged"), export_hf_llava(out, tmp_path / "hf")
    merged, *_ = load_run(merged_dir, device="cpu")
    exported = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    assert not is_quantized(merged) and "de-quantised base" in (hf_dir / "README.md").read_text()
    with torch.no_grad():
        reference = model(input_ids=ids).logits.float()
        for other in (merged(input_ids=ids).logits.float(), exported(input_ids=ids).logits.float()):
            # bf16: the merge rounds base + LoRA once more than the adapter's separate matmuls do
            torch.testing.assert_close(other, reference, atol=5e-2, rtol=5e-2)
            assert (other.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


@pytest.mark.slow
def test_the_readmes_qlora_command_trains_on_the_demos_outputs(bases, tmp_path):
    """The README's QLoRA command, as typed, with `runs/local_debug/...` standing for the tiny bases and data."""
    from readme_commands import command_for, readme_commands

    command = command_for(readme_commands(), "vir-train", **{"model__llm__quantization": "nf4"})
    places = {"runs/local_debug/bases/llm": bases.llm, "runs/local_debug/bases/clip": bases.clip,
              "runs/local_debug/data/train.json": bases.data.train, "runs/local_debug/data": bases.data.root,
              "runs/qlora_try": tmp_path / "qlora_try"}
    args = []
    for arg in command.args:
        key, _, value = arg.partition("=")
        args.append(f"{key}={places.get(value, value)}")
    assert sum(str(v) in " ".join(args) for v in places.values()) == len(places)  # every path was mapped
    proc = subprocess.run([str(Path(sys.executable).parent / "vir-train"), *args, "training.report_to=[]"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "qlora_try"
    assert (run / "adapter_model.safetensors").is_file() and (run / "mm_projector.bin").is_file()
    saved = OmegaConf.load(run / "vir_config.yaml")
    assert saved.model.llm.quantization == "nf4" and saved.training.max_steps == 5
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 5


def test_ensure_initialised_gives_an_empty_or_broken_projector_real_values():
    from vir.models.quantization import ensure_initialised

    projector = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16)).to(torch.bfloat16)
    with torch.no_grad():
        projector[0].weight.zero_()
        projector[2].weight.fill_(float("nan"))
    ensure_initialised(projector, "mm_projector")
    for layer in (projector[0], projector[2]):
        assert layer.weight.dtype == torch.bfloat16 and torch.isfinite(layer.weight).all() and layer.weight.any()
    healthy = torch.nn.Linear(4, 4)
    before = healthy.weight.detach().clone()
    ensure_initialised(healthy, "fine")
    assert torch.equal(healthy.weight, before)  # a usable layer is left alone


@pytest.mark.parametrize("tool", [None, "vir-merge", "vir-export"])
def test_vir_demo_loads_a_run_merge_or_export_in_4bit_and_answers(bases, tmp_path, tool):
    """`vir-demo --load-in-4bit` on a run trained in full precision, on its vir-merge and on its vir-export
    output: the LLM's decoder layers load as nf4, the tower and the projector do not, and the chat engine
    streams an answer for a test image (hidden 64: see `bases`)."""
    from app_fixtures import converted

    from vir.app.chat import ChatEngine, Sampling, Turn, open_images
    from vir.app.loading import load_chat_model

    cfg = run_config(bases, tmp_path / "run", "stage2_lora", "training.max_steps=1")
    path = train(cfg).output_dir
    if tool is not None:
        path = converted(tool, path, tmp_path / "out")
    cm = load_chat_model(path, device="cpu", load_in_4bit=True)
    assert is_quantized(cm.model)
    kinds = _linear_kinds(cm.model)
    assert any(kind == "Linear4bit" and ".layers." in name for name, kind in kinds.items())
    assert not any(kind == "Linear4bit" and ("vision_tower" in name or "projector" in name)
                   for name, kind in kinds.items())
    item = load_eval_items(bases.data.test, bases.data.root)[0]
    question = item.query.messages[-1].content.replace("<image>", "").strip()
    image = bases.data.root / item.image_paths[0]
    partials = list(ChatEngine(cm).stream([Turn(question, open_images([image]))], Sampling(max_new_tokens=4)))
    assert partials and isinstance(partials[-1], str)
