"""`make bench`, part 1: vir against transformers' `LlavaForConditionalGeneration` + the stock `Trainer`, same
model (shapes and weights), same data, same number of optimizer steps, each side in its own process.

Shapes ("small", not trivial): LLM hidden 512, intermediate 1376, 4 layers, 8 heads (4 KV), vocab 32000 and
128256; CLIP hidden 256, 4 layers, 112 px, patch 14 (64 image tokens); batch 8. Data: synthetic LLaVA-format
records, 70 % with an image (sizes vary), 30 % text-only, 1-3 turns, answers of 16-200 tokens. Both sides train
LLaVA's stage-2 LoRA (r 128, alpha 256 on the LLM's linear layers, the projector fully, lr 2e-4): vir with what
`vir-train training=stage2_lora` does by default, the baseline with peft's LoRA on transformers' Llava, the stock
`Trainer` and a collator that pads each batch to its longest sample.

Tokens are real (non-pad) tokens, image tokens included, counted in the batches that trained; the first
`WARMUP` steps are not timed. Peak RSS is the process's own (`ru_maxrss`). Writes
`benchmarks/results/train_throughput.json` and prints a table.

    .venv/bin/python benchmarks/train_compare.py                      # BENCH_STEPS=4 (env) timed steps per run
    .venv/bin/python benchmarks/train_compare.py --vocab 32000 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
WARMUP = 2
BATCH = 8
LLM = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
           max_position_embeddings=2048)
CLIP = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=112,
            patch_size=14)
LORA = dict(r=128, alpha=256, lr=2e-4)


# ----------------------------------------------------------------------------------------------- shared set-up
def _words(rng: random.Random, n: int, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def build_data(root: Path, num_records: int, seed: int = 0) -> Path:
    """Synthetic LLaVA-format records and images under `root` (see module doc); returns the JSON file."""
    from PIL import Image

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(num_records):
        turns = []
        with_image = rng.random() < 0.7
        for t in range(rng.choice([1, 1, 2, 3])):
            question = _words(rng, rng.randint(5, 25), vocab) + "?"
            if t == 0 and with_image:
                question = "<image>\n" + question
            turns += [{"from": "human", "value": question},
                      {"from": "gpt", "value": _words(rng, rng.randint(16, 200) * 2 // 3, vocab) + "."}]
        record = {"id": f"r{k}", "conversations": turns}
        if with_image:
            size = (rng.randint(60, 300), rng.randint(60, 300))
            pixels = np.random.default_rng(k).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / "images" / f"{k}.jpg", quality=90)
            record["image"] = f"images/{k}.jpg"
        records.append(record)
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path


def build_bases(root: Path, data: Path, vocab_size: int) -> tuple[Path, Path]:
    """A BPE tokenizer trained on the data (Llama-3 special tokens), a random Llama with `vocab_size` rows and a
    random CLIP tower, saved as local directories."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from vir.demo.tokenizer import train_llama3_style_tokenizer
    from vir.models.builder import clip_image_processor

    texts = [turn["value"] for record in json.loads(data.read_text()) for turn in record["conversations"]]
    llm, clip = root / f"llm_{vocab_size}", root / "clip"
    tokenizer = train_llama3_style_tokenizer(texts, llm, vocab_size=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **LLM)).save_pretrained(str(llm))
    tokenizer.save_pretrained(str(llm))
    if not (clip / "config.json").is_file():
        torch.manual_seed(1)
        CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(str(clip))
        clip_image_processor(CLIP["image_size"]).save_pretrained(str(clip))
    return llm, clip


def run_config(root: Path, data: Path, llm: Path, clip: Path, steps: int):
    from vir.utils.config import compose_config

    return compose_config([
        "training=stage2_lora", f"model.llm.path={llm}", f"model.vision_tower.path={clip}",
        "model.llm.dtype=float32",  # the 8B group's bf16 is for GPUs; on this CPU both sides train in fp32
        f"data.train_path={data}", f"data.image_folder={data.parent}", f"training.output_dir={root / 'run'}",
        f"training.max_steps={steps}", f"training.per_device_train_batch_size={BATCH}", "training.save_steps=100000",
        "training.logging_steps=1000", "training.report_to=[]", "recipe.num_visualizer_samples=0",
        *os.environ.get("BENCH_OURS_OVERRIDES", "").split(),  # e.g. "data.packing=false" to compare a variant
    ])


# ------------------------------------------------------------------------------------------------ measuring
class Meter:
    """Counts real and padded tokens and samples of every batch that trains, and times steps after `WARMUP`."""

    def __init__(self):
        self.steps, self.real, self.padded, self.samples, self.start = 0, 0, 0, 0, None

    def batch(self, inputs: dict, pad_id: int) -> None:
        if self.steps < WARMUP:
            return
        if "attention_mask" in inputs:  # padded rows, a sample each
            mask = inputs["attention_mask"]
            self.real += int(mask.sum())
            self.padded += int(mask.numel())
            self.samples += int(mask.shape[0])
        else:  # packed rows (vir.data.packing): samples start at position 0, a row's pad tail is pad ids
            real = inputs["input_ids"] != pad_id
            self.real += int(real.sum())
            self.padded += int(real.numel())
            self.samples += int(((inputs["position_ids"] == 0) & real).sum())

    def step_end(self) -> None:
        self.steps += 1
        if self.steps == WARMUP:
            self.start = time.perf_counter()

    def result(self) -> dict:
        seconds = time.perf_counter() - self.start
        return {"tokens_per_s": self.real / seconds, "samples_per_s": self.samples / seconds,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "padding_fraction": 1 - self.real / self.padded, "timed_steps": self.steps - WARMUP,
                "seconds": seconds}


def _metered(trainer_class, meter: Meter):
    from transformers import TrainerCallback

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            meter.step_end()

    class Metered(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepEnd())

        def training_step(self, model, inputs, *args, **kwargs):
            meter.batch(inputs, getattr(self.processing_class, "pad_token_id", None))
            return super().training_step(model, inputs, *args, **kwargs)

    return Metered


def run_ours(root: Path, data: Path, llm: Path, clip: Path, steps: int) -> dict:
    from vir.training import run as run_module

    meter = Meter()
    run_module.LlavaTrainer = _metered(run_module.LlavaTrainer, meter)
    run_module.run_training(run_config(root, data, llm, clip, steps + WARMUP))
    return meter.result()


def run_hf(root: Path, data: Path, llm: Path, clip: Path, steps: int) -> dict:
    """transformers' Llava with our initial weights, peft LoRA, the stock Trainer, per-batch padding."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

    from vir.data.dataset import LazySupervisedDataset
    from vir.export.hf_llava import hf_llava_config, hf_state_dict
    from vir.models.builder import build_all

    cfg = run_config(root, data, llm, clip, steps + WARMUP)
    ours, tokenizer, processor = build_all(cfg)  # the same initial weights as vir's run (same seedless init)
    hf_config = hf_llava_config(ours.config)
    model = LlavaForConditionalGeneration(hf_config)
    model.load_state_dict(hf_state_dict(ours.state_dict()), strict=True)
    del ours
    model.model.vision_tower.requires_grad_(False)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.05, task_type="CAUSAL_LM",
                      target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
                      modules_to_save=["multi_modal_projector"])
    model = get_peft_model(model, lora)
    dataset = LazySupervisedDataset(data, tokenizer, processor, num_image_tokens=hf_config.image_seq_length,
                                    image_folder=data.parent, model_max_length=cfg.model.model_max_length)

    def collate(items):  # LLaVA's DataCollatorForSupervisedDataset: pad to the longest in the batch
        ids = torch.nn.utils.rnn.pad_sequence([i["input_ids"] for i in items], batch_first=True,
                                              padding_value=tokenizer.pad_token_id)
        labels = torch.nn.utils.rnn.pad_sequence([i["labels"] for i in items], batch_first=True, padding_value=-100)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(tokenizer.pad_token_id).long()}
        images = [i["pixel_values"] for i in items if i["pixel_values"].shape[0]]
        if images:
            batch["pixel_values"] = torch.cat(images)
        return batch

    meter = Meter()
    args = TrainingArguments(output_dir=str(root / "hf_run"), max_steps=steps + WARMUP,
                             per_device_train_batch_size=BATCH, learning_rate=LORA["lr"],
                             lr_scheduler_type="cosine", warmup_steps=0.03,
                             save_strategy="no", report_to=[], logging_steps=1000, remove_unused_columns=False,
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=42)
    _metered(Trainer, meter)(model=model, args=args, train_dataset=dataset, data_collator=collate).train()
    return meter.result()


def time_data_pipeline(root: Path, data: Path, llm: Path, clip: Path, batches: int = 6) -> dict:
    """Samples/s of vir's data pipeline alone (records -> tokens, images -> pixels, collate) with 0 and 2
    DataLoader workers: the loader must never be what a step waits for."""
    from torch.utils.data import DataLoader

    from vir.data.collator import DataCollatorForSupervisedDataset
    from vir.data.dataset import LazySupervisedDataset
    from vir.models.builder import build_inputs

    cfg = run_config(root, data, llm, clip, 1)
    tokenizer, processor, config = build_inputs(cfg)
    dataset = LazySupervisedDataset(data, tokenizer, processor, num_image_tokens=config.num_image_tokens,
                                    image_folder=data.parent, model_max_length=cfg.model.model_max_length)
    out = {}
    for workers in (0, 2):
        loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                            drop_last=True, collate_fn=DataCollatorForSupervisedDataset(
                                tokenizer.pad_token_id, packing=cfg.data.packing,
                                pack_row_tokens=cfg.data.pack_row_tokens))
        rates = []
        for _ in range(3):  # the median of 3 passes; each pass's first batch (worker start-up, caches) untimed
            iterator = iter(loader)
            next(iterator)
            start, seen = time.perf_counter(), 0
            for _, batch in zip(range(batches), iterator):
                seen += BATCH  # drop_last: every batch is full
            rates.append(seen / (time.perf_counter() - start))
        out[f"samples_per_s_workers_{workers}"] = sorted(rates)[1]
    return out


# ---------------------------------------------------------------------------------------------------- driver
def _side(args) -> None:
    root = Path(args.root)
    data, llm, clip = root / "data" / "train.json", root / f"llm_{args.vocab}", root / "clip"
    fn = run_ours if args.side == "ours" else run_hf
    print("RESULT " + json.dumps(fn(root / args.side / str(args.vocab), data, llm, clip, args.steps)))


def _run_side(side: str, root: Path, vocab: int, steps: int) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, "--side", side, "--root", str(root), "--vocab", str(vocab),
                           "--steps", str(steps)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"{side} at vocab {vocab} failed:\n{done.stderr[-4000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _median_run(side: str, root: Path, vocab: int, steps: int, repeats: int) -> dict:
    """The run with the median tokens/s of `repeats` runs of `side` (each in its own process); every run's
    tokens/s is kept under `tokens_per_s_runs`."""
    runs = sorted((_run_side(side, root, vocab, steps) for _ in range(repeats)), key=lambda r: r["tokens_per_s"])
    return {**runs[len(runs) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("BENCH_STEPS", 4)), help="timed steps")
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--repeats", type=int, default=int(os.environ.get("BENCH_REPEATS", 1)),
                        help="runs per side, the median reported (BENCH_REPEATS)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--side", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.vocab = args.vocab[0]
        return _side(args)
    import transformers

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = build_data(root / "data", num_records=BATCH * (args.steps + WARMUP) + 16)
        for vocab in args.vocab:
            build_bases(root, data, vocab)
            row = {"vocab_size": vocab, "ours": _median_run("ours", root, vocab, args.steps, args.repeats),
                   "hf": _median_run("hf", root, vocab, args.steps, args.repeats)}
            row["ratio_tokens_per_s"] = row["ours"]["tokens_per_s"] / row["hf"]["tokens_per_s"]
            row["ratio_peak_rss"] = row["ours"]["peak_rss_gb"] / row["hf"]["peak_rss_gb"]
            runs.append(row)
            print(_table([row]), flush=True)
        pipeline = time_data_pipeline(root / "pipeline", data, root / f"llm_{args.vocab[0]}", root / "clip")
        step_rate = max(row["ours"]["samples_per_s"] for row in runs)
        pipeline["ratio_to_training_samples_per_s"] = pipeline["samples_per_s_workers_0"] / step_rate
    result = {"runs": runs, "data_pipeline": pipeline, "steps": args.steps, "warmup_steps": WARMUP, "batch_size": BATCH,
              "repeats": args.repeats,
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "torch_threads": torch.get_num_threads()},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(_table(runs))
    print(f"data pipeline alone: {pipeline['samples_per_s_workers_0']:.1f} samples/s (0 workers), "
          f"{pipeline['samples_per_s_workers_2']:.1f} (2 workers): "
          f"{pipeline['ratio_to_training_samples_per_s']:.0f}x the fastest training rate")
    print(f"wrote {args.out}")


def _table(runs: list[dict]) -> str:
    lines = [f"{'vocab':>7} {'side':>5} {'tokens/s':>9} {'samples/s':>9} {'peak RSS GB':>11} {'padding':>8}"]
    for row in runs:
        for side in ("ours", "hf"):
            r = row[side]
            lines.append(f"{row['vocab_size']:>7} {side:>5} {r['tokens_per_s']:>9.0f} {r['samples_per_s']:>9.2f} "
                         f"{r['peak_rss_gb']:>11.2f} {r['padding_fraction']:>8.1%}")
        lines.append(f"{'':>7} {'ratio':>5} {row['ratio_tokens_per_s']:>9.2f} {'':>9} {row['ratio_peak_rss']:>11.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
