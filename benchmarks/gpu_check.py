"""`make gpu-check`: does LLaVA-1.5 on Llama-3-8B fit one GPU, and how fast does it train? No downloaded weights.

A random-init Llama-3-8B-shaped LLM (vocabulary 128256) is written once as a local checkpoint, then loaded the
way a user's run loads Meta-Llama-3-8B-Instruct: in 4-bit nf4 for QLoRA, in bf16 for LoRA. A random-init
CLIP-ViT-L/14-336-shaped tower gives 576 image tokens. Each variant trains a few optimizer steps on one
2048-token sample holding an image (micro-batch 1, gradient checkpointing, LoRA r 64, projector trained).
For each variant it prints and writes to JSON the peak GPU memory allocated, tokens per second, MFU and
`vir-plan`'s estimate for the same config.

    python benchmarks/gpu_check.py                 # on a GPU (QLoRA needs bitsandbytes)
    python benchmarks/gpu_check.py --tiny          # the same code on tiny shapes on the CPU (a smoke test)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vir.demo.tokenizer import train_llama3_style_tokenizer
from vir.models.builder import build_all
from vir.models.quantization import is_quantized
from vir.planning.memory import GB, plan_memory
from vir.planning.probe import peak_step_bytes
from vir.training.modes import apply_training_mode
from vir.utils.config import compose_config

# Dense bf16 tensor-core peaks (FLOP/s) by device name, for MFU; --peak-tflops for a device not listed.
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12}
QLORA_GOAL_GB = 11.0  # the QLoRA r-64 peak this check is for (GiB, as torch reports it)
SHAPES = {
    "full": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096),
}
TINY_TOWER = ["model.vision_tower.hidden_size=32", "model.vision_tower.intermediate_size=64",
              "model.vision_tower.num_hidden_layers=2", "model.vision_tower.num_attention_heads=2",
              "model.vision_tower.image_size=56", "model.vision_tower.patch_size=14"]


def write_random_llm(directory: Path, shapes: dict, device: str) -> None:
    """A random-init Llama (bf16) and a Llama-3-style tokenizer saved where `model.llm.path` will point."""
    tokenizer = train_llama3_style_tokenizer(["a photo of a cat on a mat", "what is in the image?"] * 50, directory,
                                             vocab_size=300)
    config = LlamaConfig(**shapes, rope_theta=500000.0, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    with torch.device(device):  # initialised in bf16 directly: 16 GB at 8B, where fp32 first would need 32
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(directory))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


def check_overrides(llm_dir: Path, seq: int, gpu_gb: float) -> list:
    """The settings every variant shares: the random LLM at `llm_dir`, a random tower, one process, micro-batch 1,
    LoRA r 64, gradient checkpointing, `seq` tokens."""
    return ["model.llm.path=" + str(llm_dir), "model.vision_tower.path=null", "training.deepspeed=null",
            "training.global_batch_size=null", "training.per_device_train_batch_size=1", "training.lora_r=64",
            "training.lora_alpha=128", "training.gradient_checkpointing=true", f"model.model_max_length={seq}",
            f"plan.gpu_gb={gpu_gb}"]


def peak_flops(device_name: str) -> Optional[float]:
    """The bf16 peak of a device from its name (the longest listed name it contains), or None."""
    names = sorted((n for n in BF16_PEAK_FLOPS if n in device_name), key=len, reverse=True)
    return BF16_PEAK_FLOPS[names[0]] if names else None


def run_variant(name: str, overrides: list, steps: int, seq: int, device: str,
                flops_peak: Optional[float] = None, micro_batch: int = 1) -> dict:
    """Train `steps` timed steps (after one warm-up step) of the config `overrides` compose to, on micro-batches
    of `micro_batch` copies of one `seq`-token sample holding an image; measure the step's peak memory and speed
    and set the plan's estimate beside them."""
    cfg = compose_config(overrides)
    plan = plan_memory(cfg)
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer, _ = build_all(cfg)
    model = apply_training_mode(model, cfg.training, vision_tower_freeze=True)
    if cfg.training.gradient_checkpointing:  # as the Trainer switches it on
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if not is_quantized(model):  # a quantized model was placed on its device while it loaded
        model.to(device)
    config = model.config  # a peft wrapper answers with its model's
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    image_tokens = config.num_image_tokens
    text = torch.randint(10, len(tokenizer) - 10, (seq - image_tokens - 1,))
    ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), torch.full((image_tokens,), config.image_token_id), text])
    labels = ids.clone()
    labels[: 1 + image_tokens] = -100
    size = config.vision_config.image_size
    rows = lambda tensor: tensor[None].repeat(micro_batch, 1).to(device)  # noqa: E731
    batch = {"input_ids": rows(ids), "labels": rows(labels), "attention_mask": rows(torch.ones(seq, dtype=torch.long)),
             "pixel_values": torch.randn(micro_batch, 3, size, size, device=device)}
    model.train()

    def step() -> torch.Tensor:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times = []
    for index in range(steps + 1):  # the first step warms up (allocator, kernels) and creates AdamW's states
        if device == "cuda":
            torch.cuda.synchronize()
            if index == 1:  # the peak of a training step, not of loading
                torch.cuda.reset_peak_memory_stats()
        tick = time.perf_counter()
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - tick)
    # On the CPU, the same step's peak counted by a dispatch mode (vir.planning.probe): the check runs end to end.
    peak = torch.cuda.max_memory_allocated() / GB if device == "cuda" else peak_step_bytes(step, model, optimizer) / GB
    seconds = sum(times) / len(times)
    # Model FLOPs a token (MFU's convention: recomputation and attention's own matmuls left out): 2 N forward and
    # 2 N for the input gradients through the LLM's N weights, 2 more per weight that trains. N comes from the plan,
    # which counts a 4-bit weight once (bitsandbytes stores two in a byte).
    llm_weights = plan.total_parameters - sum(p.numel() for p in model.get_vision_tower().parameters())
    flops = (4 * llm_weights + 2 * sum(p.numel() for p in trainable)) * micro_batch * seq / seconds
    result = {"variant": name, "peak_gb": round(peak, 3), "peak_measured_by": "cuda max_memory_allocated"
              if device == "cuda" else "vir.planning.probe.LiveBytes (CPU)", "planned_peak_gb": round(plan.peak_gb, 3),
              "planned_peak_at": plan.peak_at, "plan_error": round((plan.peak_gb - peak) / peak, 3),
              "tokens_per_s": round(micro_batch * seq / seconds, 1), "seconds_per_step": round(seconds, 3),
              "mfu": round(flops / flops_peak, 3) if flops_peak else None, "loss": round(loss.item(), 3),
              "trainable_parameters": sum(p.numel() for p in trainable), "plan": json.loads(plan.to_json())}
    if name == "qlora" and device == "cuda":
        result["goal_peak_gb"], result["meets_goal"] = QLORA_GOAL_GB, peak <= QLORA_GOAL_GB
    print(json.dumps({k: v for k, v in result.items() if k != "plan"}))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU: check the script itself")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    parser.add_argument("--variants", default="qlora,lora_bf16")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak in TFLOP/s, for MFU (default: looked up by its name)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no GPU here: an 8B model on the CPU would take hours. Run on a GPU, or --tiny for a smoke test")
    device = "cpu" if args.tiny else "cuda"
    shapes = SHAPES["tiny" if args.tiny else "full"]
    seq = 256 if args.tiny else 2048
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    start = time.perf_counter()
    write_random_llm(work / "llm", shapes, device)
    gpu_gb = torch.cuda.get_device_properties(0).total_memory / GB if device == "cuda" else 24
    common = check_overrides(work / "llm", seq, gpu_gb) + (TINY_TOWER if args.tiny else [])
    variants = {"qlora": ["experiment=llava15_qlora", "model.llm.quantization=nf4"],
                "lora_bf16": ["experiment=llava15_stage2_lora", "model.llm.dtype=bfloat16"]}
    flops_peak = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_flops(torch.cuda.get_device_name(0)) if device == "cuda" else None)
    results = {"device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "sequence_length": seq,
               "setup_seconds": round(time.perf_counter() - start, 1), "runs": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants.split(","):
        try:
            results["runs"].append(run_variant(name, variants[name] + common, args.steps, seq, device, flops_peak))
        except ImportError as err:  # bitsandbytes missing on this machine
            results["runs"].append({"variant": name, "skipped": str(err)})
            print(f"{name}: skipped ({err})")
        except torch.cuda.OutOfMemoryError as err:  # bf16 LoRA of an 8B needs more than a 24 GB card: go on
            results["runs"].append({"variant": name, "out_of_memory": str(err).splitlines()[0]})
            print(f"{name}: out of GPU memory")
            gc.collect()
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(results, indent=2))  # after each variant: a cut run keeps the rest
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
