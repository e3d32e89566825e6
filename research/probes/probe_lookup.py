"""How fast does a tiny LLM learn the synthetic task's look-ups? A recipe probe, not a test.

The real stage 2 re-runs the frozen tower, pads multi-turn records and trains LoRA: too slow to sweep
learning rates on a 2-core CPU. This probe keeps only what decides whether the task is learnable: the frozen
tower's patch features are computed once for a bank of scenes, and a fresh Llama + LLaVA's mlp2x_gelu
projector (full fine-tuning) learn single-turn questions rendered with the project's llama3 template. Every
`--eval-every` steps it prints teacher-forced exact match per question type on held-out scenes, beside the
blind baseline (features zeroed). `--oracle` replaces the tower by one-hot cell labels (occupied, colour,
shape, size, row, column) to separate the vision side from the LLM side.

This is how the stage-2 learning rate was chosen: on an H200, with 13 configurations in parallel, lr 1e-3 or
3e-3 never left the blind baseline in 8000 steps, while 3e-4 learnt count/exists/attribute (docs/training-log.md).
The LLM side can also start from a saved base (`--init-llm`, e.g. the default's text-pretrained Llama) and
train as stage2_lora does (`--lora-r`, `--lora-alpha`, LoRA+ `--lora-plus`, peft `--lora-save`), with
`--beta2`, `--schedule constant` and `--rope-theta` (the pipeline's Llama uses 500000) to vary the optimiser.
`--aux-types locate` adds training-only sub-skill questions ("Where is the red circle?") to the rotation.

    .venv/bin/python research/probes/probe_lookup.py --bases runs/local_debug/bases \\
        --tokenizer runs/local_debug/data/tokenizer --steps 3000 --lr 3e-4 [--device cuda] [--oracle]
    OMP_NUM_THREADS=1 .venv/bin/python research/probes/probe_lookup.py --threads 1 --steps 2500 --eval-every 500 \\
        --init-llm runs/local_debug/bases/llm --lora-r 16 --lr 1e-3      # ~0.33 s/step on one CPU core
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel, LlamaForCausalLM

from vir.data.collator import pad_batch
from vir.data.conversation import IGNORE_INDEX, Message
from vir.data.images import preprocess_images
from vir.data.templates import build_example
from vir.demo.config import SyntheticConfig
from vir.demo.llm_base import build_llama
from vir.demo.synthetic import SIZES, cell_labels, make_question, render_scene, sample_scene
from vir.models.builder import prepare_tokenizer, resize_token_embeddings_mean_init
from vir.models.llava_arch import splice_image_features
from vir.models.projector import LlavaMultiModalProjector
from vir.training.modes import lora_target_modules
from vir.utils.config_schema import LLMConfig


def question_bank(spec: SyntheticConfig, types: list[str], n: int, seed: int, stream: int):
    """`n` (scene, question) pairs, question types in rotation (a scene that cannot support one is redrawn)."""
    rng = np.random.default_rng([seed, 7, stream])
    pairs = []
    while len(pairs) < n:
        scene = sample_scene(rng, spec)
        question = make_question(rng, scene, types[len(pairs) % len(types)], spec)
        if question is not None:
            pairs.append((scene, question))
    return pairs


def oracle_features(scene) -> torch.Tensor:
    """One-hot cell labels in patch order: [grid*grid, 2 + colours + shapes + sizes + 2 * grid] for occupied,
    colour, shape, size (zero on empty cells), row and column."""
    grid = scene.grid
    sizes = (2, len(scene.colours), len(scene.shapes), len(SIZES), grid, grid)
    offsets = np.cumsum((0, *sizes[:-1]))
    features = torch.zeros(grid * grid, sum(sizes))
    for cell, (occupied, colour, shape, size) in enumerate(cell_labels(scene).tolist()):
        labels = (occupied, colour, shape, size) if occupied else (occupied,)
        for offset, label in zip(offsets, labels):
            features[cell, offset + label] = 1
        features[cell, offsets[4] + cell // grid] = features[cell, offsets[5] + cell % grid] = 1
    return features


@torch.no_grad()
def scene_features(pairs, tower, processor, image_size: int, oracle: bool, device) -> torch.Tensor:
    """[n, num_patches, D]: the frozen tower's last-layer patch features (CLS dropped), or oracle labels."""
    chunks = []
    for start in range(0, len(pairs), 256):
        scenes = [scene for scene, _ in pairs[start : start + 256]]
        if oracle:
            chunks.append(torch.stack([oracle_features(s) for s in scenes]))
            continue
        pixels = preprocess_images([render_scene(s, image_size) for s in scenes], processor, "pad").to(device)
        chunks.append(tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:].cpu())
    return torch.cat(chunks).to(device)


def encode(pairs, tokenizer, image_token_id: int, num_image_tokens: int, question_first: bool = False):
    """llama3-template (input_ids, labels) per question: `<image>\\n{question}` (or `{question}\\n<image>`)
    -> answer."""
    return [
        build_example([Message("user", f"{q.text}\n<image>" if question_first else f"<image>\n{q.text}"),
                       Message("assistant", q.answer)], tokenizer,
                      "llama3", image_token_id, num_image_tokens)
        for _, q in pairs
    ]


class Probe(nn.Module):
    """Llama + projector; `forward(features, ids, mask)` splices projected features at the image tokens."""

    def __init__(self, llm: LlamaForCausalLM, feature_dim: int, image_token_id: int):
        super().__init__()
        self.llm = llm
        self.projector = LlavaMultiModalProjector(feature_dim, llm.config.hidden_size)
        self.image_token_id = image_token_id

    def forward(self, features, input_ids, attention_mask, labels=None):
        embeds = splice_image_features(self.llm.get_input_embeddings()(input_ids), input_ids,
                                       self.projector(features), self.image_token_id)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels)


def collate(examples, pad_id: int, device):
    """(input_ids, attention_mask, labels) [B, T], right-padded as the project's collator does."""
    ids = pad_batch([x for x, _ in examples], pad_id)
    labels = pad_batch([y for _, y in examples], IGNORE_INDEX)
    mask = pad_batch([[1] * len(x) for x, _ in examples], 0)
    return ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def evaluate(model, features, examples, pairs, pad_id: int, device, blind: bool) -> dict:
    """Teacher-forced exact match (every answer token argmax-correct) per question type, in %."""
    model.eval()
    hits = defaultdict(list)
    for start in range(0, len(examples), 100):
        ids, mask, labels = collate(examples[start : start + 100], pad_id, device)
        feats = features[start : start + 100]
        logits = model(torch.zeros_like(feats) if blind else feats, ids, mask).logits[:, :-1]
        target = labels[:, 1:]
        right = ((logits.argmax(-1) == target) | (target == IGNORE_INDEX)).all(-1).tolist()
        for ok, (_, question) in zip(right, pairs[start : start + 100]):
            hits[question.question_type].append(ok)
            hits["overall"].append(ok)
    model.train()
    return {name: round(100 * float(np.mean(v)), 1) for name, v in sorted(hits.items())}


def fit(model, features, examples, groups, steps: int, *, lr: float, batch_size: int, schedule: str, beta2: float,
        eval_set, pad_id: int, device, eval_every: int, seed: int, tag: str = "") -> None:
    """AdamW (no weight decay) on parameter `groups`, linear warm-up over 5 % of `steps`, then cosine to 0 or
    constant; random batches of `examples`. Every `eval_every` steps (and at the end) prints teacher-forced
    exact match per type on `eval_set` = (features, examples, pairs) beside the blind baseline."""
    eval_feats, eval_examples, eval_pairs = eval_set
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0, betas=(0.9, beta2))
    warmup = max(1, steps // 20)
    decay = (lambda s: 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))) if schedule == "cosine" else (
        lambda s: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * decay(s))
    params = [p for group in groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.randint(len(examples), (batch_size,), generator=generator)
        ids, mask, labels = collate([examples[i] for i in batch.tolist()], pad_id, device)
        loss = model(features[batch.to(device)], ids, mask, labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % eval_every == 0 or step == steps:
            seen = evaluate(model, eval_feats, eval_examples, eval_pairs, pad_id, device, blind=False)
            blind = evaluate(model, eval_feats, eval_examples, eval_pairs, pad_id, device, blind=True)
            print(f"{tag}step {step} ({time.perf_counter() - start:.0f}s) loss {loss.item():.3f} {seen} "
                  f"blind {blind['overall']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bases", default="runs/local_debug/bases", help="holds clip/ (the frozen tower)")
    parser.add_argument("--tokenizer", default="runs/local_debug/data/tokenizer")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--train-questions", type=int, default=20000)
    parser.add_argument("--eval-questions", type=int, default=600)
    parser.add_argument("--types", default="count,exists,attribute,relation")
    parser.add_argument("--aux-types", default="", help="training-only question types in the rotation, e.g. "
                        "locate (never evaluated)")
    parser.add_argument("--sentence-fraction", type=float, default=0.0)
    parser.add_argument("--oracle", action="store_true", help="one-hot cell labels instead of the tower")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-llm", default=None, help="start from this HF Llama directory (else a fresh one)")
    parser.add_argument("--rope-theta", type=float, default=10000.0)
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA on the LLM's linear layers (0 = full FT)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="default 2 * r")
    parser.add_argument("--beta2", type=float, default=0.999, help="AdamW's beta2")
    parser.add_argument("--schedule", default="cosine", choices=("cosine", "constant"), help="after warm-up")
    parser.add_argument("--lora-plus", type=float, default=1.0, help="LoRA+: lora_B's lr = this x --lr")
    parser.add_argument("--lora-save", default="", help="comma-separated modules trained fully beside LoRA "
                        "(peft's modules_to_save), e.g. embed_tokens,lm_head")
    parser.add_argument("--standardize", action="store_true", help="z-score the tower features per dimension")
    parser.add_argument("--proj-init-std", type=float, default=0.0, help="init std of the projector's output "
                        "layer (0 = nn.Linear's default)")
    parser.add_argument("--question-first", action="store_true", help="`{question}\\n<image>`: image tokens "
                        "come after the question and can attend to it")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = SyntheticConfig(sentence_answer_fraction=args.sentence_fraction)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    tower = CLIPVisionModel.from_pretrained(f"{args.bases}/clip").eval().to(device)
    processor = CLIPImageProcessorPil.from_pretrained(f"{args.bases}/clip")
    types = args.types.split(",")
    start = time.perf_counter()
    train_types = types + [t for t in args.aux_types.split(",") if t]
    train_pairs = question_bank(spec, train_types, args.train_questions, args.seed, 0)
    eval_pairs = question_bank(spec, types, args.eval_questions, args.seed, 1)
    train_feats, eval_feats = (scene_features(p, tower, processor, spec.image_size, args.oracle, device)
                               for p in (train_pairs, eval_pairs))
    if args.standardize:  # per-dimension z-scores with the train bank's statistics (the tower's are ~40-norm)
        mean, std = train_feats.mean((0, 1)), train_feats.std((0, 1)) + 1e-6
        train_feats, eval_feats = (train_feats - mean) / std, (eval_feats - mean) / std
    num_tokens = train_feats.shape[1]
    train_ex, eval_ex = (encode(p, tokenizer, image_token_id, num_tokens, args.question_first)
                         for p in (train_pairs, eval_pairs))
    print(f"banks ready in {time.perf_counter() - start:.0f}s; features {tuple(train_feats.shape)}", flush=True)
    if args.init_llm:
        llm = LlamaForCausalLM.from_pretrained(args.init_llm)
        resize_token_embeddings_mean_init(llm, len(tokenizer))  # a base without <image>/<pad>, as the builder does
    else:
        llm = build_llama(LLMConfig(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                    num_key_value_heads=args.heads, max_position_embeddings=512,
                                    rope_theta=args.rope_theta), tokenizer)
    if args.lora_r:  # as stage2_lora: LoRA on every linear layer of the LLM (not lm_head), projector trained
        from peft import LoraConfig, get_peft_model

        llm = get_peft_model(llm, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha or 2 * args.lora_r,
                                             lora_dropout=0.0, target_modules=lora_target_modules(llm),
                                             task_type="CAUSAL_LM",
                                             modules_to_save=[m for m in args.lora_save.split(",") if m] or None))
    model = Probe(llm, train_feats.shape[-1], image_token_id).to(device)
    if args.proj_init_std:  # the projector's output layer at this std (zero bias): image tokens at text scale
        last = model.projector[-1]
        nn.init.normal_(last.weight, std=args.proj_init_std)
        nn.init.zeros_(last.bias)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if "lora_B" not in n]},
              {"params": [p for n, p in trained if "lora_B" in n], "lr": args.lr * args.lora_plus}]
    fit(model, train_feats, train_ex, [g for g in groups if g["params"]], args.steps, lr=args.lr,
        batch_size=args.batch_size, schedule=args.schedule, beta2=args.beta2,
        eval_set=(eval_feats, eval_ex, eval_pairs), pad_id=tokenizer.pad_token_id, device=device,
        eval_every=args.eval_every, seed=args.seed)

if __name__ == "__main__":
    main()
