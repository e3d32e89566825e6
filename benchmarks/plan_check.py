"""`vir-plan` against measured peaks, on this machine: a matrix of training modes, dtypes and shapes.

For each case a random-init Llama of the given shape is trained for a step exactly as `make gpu-check` does
(benchmarks/gpu_check.py: forward, backward, AdamW, one sample holding an image), and the step's peak is measured:
on the CPU by `vir.planning.probe.LiveBytes`, on a GPU by `torch.cuda.max_memory_allocated`. The plan's peak for the
same config is set beside it. Prints one line a case and writes them all to JSON.

    python benchmarks/plan_check.py                       # CPU, ~2 minutes
    python benchmarks/plan_check.py --device cuda         # the same matrix on a GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu_check.py"))
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)

# (hidden, intermediate, layers, vocabulary, tokens, micro-batch): logit-heavy, activation-heavy, a longer batch.
SHAPES = [(256, 688, 4, 32000, 1024, 1), (512, 1376, 4, 4096, 1024, 1), (384, 1024, 6, 16000, 2048, 2)]
CASES = {
    "lora bf16, checkpointing": ["training=stage2_lora", "model.llm.dtype=bfloat16"],
    "lora bf16": ["training=stage2_lora", "model.llm.dtype=bfloat16", "training.gradient_checkpointing=false"],
    "lora fp32": ["training=stage2_lora", "model.llm.dtype=float32", "training.gradient_checkpointing=false"],
    "lora bf16, no dropout": ["training=stage2_lora", "model.llm.dtype=bfloat16", "training.lora_dropout=0"],
    "lora fp32, transformers' loss": ["training=stage2_lora", "model.llm.dtype=float32", "training.loss_chunk_size=0"],
    "lora bf16, loss chunks of 256": ["training=stage2_lora", "model.llm.dtype=bfloat16",
                                      "training.loss_chunk_size=256"],
    "full bf16, checkpointing": ["training=stage2_full", "model.llm.dtype=bfloat16"],
    "full fp32": ["training=stage2_full", "model.llm.dtype=float32", "training.gradient_checkpointing=false"],
    "stage 1 bf16": ["training=stage1", "model.llm.dtype=bfloat16", "training.gradient_checkpointing=false"],
    "qlora nf4, checkpointing": ["experiment=llava15_qlora"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default="benchmarks/results/plan_check.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="plan_check_"))
    rows = []
    for hidden, intermediate, layers, vocab, tokens, micro in SHAPES:
        shape = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096)
        llm = work / f"llm_{hidden}_{layers}_{vocab}"
        gpu_check.write_random_llm(llm, shape, "cpu")
        common = gpu_check.check_overrides(llm, tokens, 24) + gpu_check.TINY_TOWER + [
            "training.lora_r=16", f"training.per_device_train_batch_size={micro}"]
        for case, overrides in CASES.items():
            extra = [o for o in common if not (o == "training.gradient_checkpointing=true"
                                               and "training.gradient_checkpointing=false" in overrides)]
            result = gpu_check.run_variant(case, overrides + extra, steps=1, seq=tokens, device=args.device,
                                           micro_batch=micro)
            result.update(shape=shape, tokens=tokens, micro_batch=micro)
            rows.append(result)
    errors = [abs(row["plan_error"]) for row in rows]
    summary = {"device": args.device, "cases": len(rows), "max_abs_error": max(errors),
               "median_abs_error": statistics.median(errors), "within_2_5_percent": sum(e <= 0.025 for e in errors),
               "torch": torch.__version__, "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"{len(rows)} cases: |error| at most {summary['max_abs_error']:.3f}, "
          f"median {summary['median_abs_error']:.3f}, {summary['within_2_5_percent']} within 2.5 %; wrote {args.out}")


if __name__ == "__main__":
    main()
