"""How fast does the LLM base learn the task's look-ups in text? The probe behind the base's settings.

Trains the base exactly as `pretrain_llm` does (`_train`: AdamW, warm-up + cosine, answers-only loss), on the
grid scene-QA documents of `build_bases` (plus `--captions` scene-caption documents), and prints greedy exact
match per question type on 400 held-out grid questions every `--eval-every` steps. One process, one thread by
default, so two probes run side by side on the 2-core machine; compare runs at equal steps *and* equal
compute (batch x steps): the step at which counting "clicks" varies from run to run by several hundred steps.

Measured on the 2-core CPU, 2026-11-26 (one thread each, two probes at a time, words init unless said; all
but the last row with the tokenizer from before the chat-header fix, ~49 instead of ~42 tokens a document):

| probe | overall % at steps |
| --- | --- |
| batch 32, random-init grid tokens (`--init random`) | 43.0 at 1000 |
| batch 32, grid tokens from their words (default) | 47.3 at 1000 |
| batch 32, 4 questions per document (`--turns 4`, 3.3x the compute) | 45.5 at 1000 |
| batch 32, lr 1e-3 | 44.8 at 1000 |
| batch 16, 2000 steps (the compute of batch 32 x 1000) | 46.5 / **56.8** at 1000 / 2000 |
| batch 8, 4000 steps (same compute) | 46.3 / 55.3 at 2000 / 4000 |
| batch 16, lr 6e-4 / 1.5e-4 (new tokenizer) | 49.3 / 47.8 at 2000 |

    OMP_NUM_THREADS=1 .venv/bin/python research/probes/probe_text_base.py --steps 2000 --batch 16

`--by-op` scores the held-out questions per program op (colour_of_shape, relation_where, ...) and `--mix`
trains on another question mix, training-only `locate` included (docs/training-log.md, 2026-11-26);
`--format description` writes every scene in words, each object with its row and column (2026-11-26).

`--device cuda` runs it on a GPU at the same steps (`research/probes/gpu_sweep.sh` runs many variants at once on a
lent one; its size sweep is in docs/training-log.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile

import torch
from transformers import AutoTokenizer

from vir.demo.bases import base_qa_spec
from vir.demo.common import as_dataclass
from vir.demo.config import LLMPretrainConfig
from vir.demo.llm_base import _train, build_llama, init_from_words
from vir.demo.scene_text import grid_token_words, grid_tokens, scene_caption_examples, scene_qa_examples
from vir.demo.synthetic import as_spec
from vir.utils.config import compose_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default="runs/local_debug/data/tokenizer", help="the data set's tokenizer")
    parser.add_argument("--init", choices=["words", "random"], default="words", help="grid token embeddings")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--turns", type=int, default=1, help="questions per scene-QA document")
    parser.add_argument("--documents", type=int, default=40000, help="scene-QA documents")
    parser.add_argument("--captions", type=int, default=0, help="scene-caption documents")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order")
    parser.add_argument("--mix", default="", help="training question mix, e.g. count=0.2,exists=0.2,attribute=0.2,"
                        "relation=0.2,locate=0.2 (training-only types allowed); held-out questions keep "
                        "demo.synthetic.question_mix")
    parser.add_argument("--by-op", action="store_true", help="score held-out questions per program op")
    parser.add_argument("--format", choices=["grid", "description"], default="grid",
                        help="scene rendering of the training and held-out documents (scene_text.SCENE_FORMATS)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for GPU sweeps (the Trainer picks the GPU whenever there is one)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides on experiment=local_debug_scratch (model sizes)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    cfg = compose_config(["experiment=local_debug_scratch", *args.overrides])
    spec = as_spec(cfg.demo.synthetic)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.add_tokens(grid_tokens(spec))
    pretrain = dataclasses.replace(as_dataclass(LLMPretrainConfig, cfg.demo.bases.llm), max_steps=args.steps,
                                   batch_size=args.batch, learning_rate=args.lr, eval_every=args.eval_every,
                                   seed=args.seed)
    mix = {}
    for item in filter(None, args.mix.split(",")):
        name, _, weight = item.partition("=")
        try:
            mix[name] = float(weight)
        except ValueError:
            parser.error(f"--mix item {item!r}: want TYPE=WEIGHT")
    try:  # the LLM base's own training mix (`demo.bases.llm.question_mix`), checked as the recipe checks it
        train_spec = base_qa_spec(spec, dataclasses.replace(pretrain, question_mix=mix))
    except ValueError as err:
        parser.error(f"--mix: {err}")
    documents = [e["messages"] for e in scene_qa_examples(train_spec, args.documents, 0, 10, turns=args.turns,
                                                          scene_format=args.format)]
    documents += scene_caption_examples(spec, args.captions, 0, 12, scene_format=args.format)
    held_out = scene_qa_examples(spec, 400, 0, 11, scene_format=args.format)
    if args.by_op:
        held_out = [{**e, "question_type": f"{e['question_type']}/{e['op']}"} for e in held_out]
    torch.manual_seed(args.seed)
    model = build_llama(cfg.model.llm, tokenizer)
    if args.init == "words":
        init_from_words(model, tokenizer, grid_token_words(spec))
    model.to(args.device)
    history = _train(model, tokenizer, documents, held_out, pretrain, tempfile.mkdtemp(prefix="probe_text_base_"))
    print(json.dumps(history))


if __name__ == "__main__":
    main()
